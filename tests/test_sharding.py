"""``trainer.strategy: fsdp``: the frozen backbone sharded over 2 gloo processes gives every adapter kind and
fusion on BERT, fusion on GPT-2, Llama and T5, and fusion with activation checkpointing the gradients of the
unsharded model (float64); each process holds half of every sharded weight; one process shards nothing and
says so; on a CUDA device (NCCL) the units give the unsharded gradients; what the option cannot run is refused
in one line."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_process import group_ranks
from conftest import tiny_batch
from test_checkpointing import KINDS, _model

from adafuse.continual.config import RunConfig, load_config
from adafuse.continual.runtime.sharding import check_shardable
from adafuse.fusion.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

CASES = [*(("bert", kind, False) for kind in [*KINDS, "fusion"]), ("bert", "fusion", True)]
CASES += [(model_type, "fusion", False) for model_type in ("gpt2", "llama", "t5")]
LABELS = torch.tensor([0, 1, 2])


def _gradients(model, rows: slice, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Gradients of the summed loss over ``rows`` of the batch (eval mode: no dropout masks to match)."""
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    model.eval()
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"][rows], batch["attention_mask"][rows])
    torch.nn.functional.cross_entropy(logits, LABELS.to(device)[rows], reduction="sum").backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _sharded_rank(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from adafuse.continual.runtime.sharding import local_share, not_sharded, shard_backbone

    results = {}
    for model_type, setup, checkpointing in CASES:
        model = _model(model_type, setup)
        model.set_activation_checkpointing(checkpointing)
        shard_backbone(model, torch.device("cpu"))
        grads = _gradients(model, slice(rank, None, world))
        for grad in grads.values():
            dist.all_reduce(grad)  # what DDP does, as a sum: the loss is summed over the rows
        share = torch.tensor([local_share(model)], dtype=torch.float64)
        dist.all_reduce(share)
        whole = not_sharded(model)
        own = [p for p in model.backbone.parameters() if p not in whole]
        sharded = sum(p.numel() for p in own if isinstance(p, DTensor)) / sum(p.numel() for p in own)
        results[(model_type, setup, checkpointing)] = (grads, local_share(model), share.item(), sharded)
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_sharded_backbone_gives_the_unsharded_gradients(tmp_path):
    out = str(tmp_path / "grads.pt")
    group_ranks(_sharded_rank, 2, out)
    results = torch.load(out, weights_only=False)
    for case in CASES:
        model_type, setup, checkpointing = case
        model = _model(model_type, setup)
        model.set_activation_checkpointing(checkpointing)
        whole = _gradients(model, slice(None))
        reduced, mine, total, share = results[case]
        # each process holds half of every sharded weight (and the whole input embeddings)
        assert share > 0.5 and mine < 1 and total == pytest.approx(2 - share), case
        assert reduced.keys() == whole.keys() and whole, case
        for name, grad in whole.items():
            torch.testing.assert_close(reduced[name], grad, rtol=1e-10, atol=1e-12, msg=f"{case} {name}")


def _one_rank(rank: int, world: int, out: str) -> None:
    import contextlib
    import io

    from adafuse.continual.runtime.sharding import is_sharded, local_share, shard_backbone

    model = _model("bert", "fusion")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        frozen = shard_backbone(model, torch.device("cpu"))
        shard_backbone(model, torch.device("cpu"))  # once a task: said once
    torch.save((is_sharded(model), local_share(model), frozen, said.getvalue()), out)


def test_one_process_keeps_the_backbone_whole_and_says_so(tmp_path):
    out = str(tmp_path / "one.pt")
    group_ranks(_one_rank, 1, out)
    sharded, share, frozen, said = torch.load(out)
    assert not sharded and share == 1.0 and frozen and all("fusion" not in name for name in frozen)
    assert said == "trainer.strategy fsdp on one process: nothing to shard, the backbone stays whole\n"


def _cuda_rank(rank: int, world: int, out: str) -> None:
    """FSDP2's units on a CUDA device over NCCL (one process: ``shard_backbone`` itself leaves a world of one
    unsharded, so its mechanism is called directly)."""
    from adafuse.continual.runtime.sharding import _fully_shard

    results = {}
    for model_type in ("bert", "llama"):
        model = _model(model_type, "fusion").cuda()
        _fully_shard(model, torch.device("cuda"))
        grads = _gradients(model, slice(None), device="cuda")
        results[model_type] = {name: grad.cpu() for name, grad in grads.items()}
    torch.save(results, out)


@pytest.mark.cuda
def test_sharding_on_a_cuda_device_gives_the_unsharded_gradients(tmp_path):
    out = str(tmp_path / "cuda.pt")
    group_ranks(_cuda_rank, 1, out, backend="nccl")
    results = torch.load(out)
    for model_type in ("bert", "llama"):
        whole = _gradients(_model(model_type, "fusion").cuda(), slice(None), device="cuda")
        assert results[model_type].keys() == whole.keys() and whole, model_type
        for name, grad in whole.items():
            torch.testing.assert_close(results[model_type][name], grad.cpu(), rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--backbone.quantization", "int8"], "backbone.quantization: 'int8' weights are not plain tensors to shard"),
        (["--trainer.compile", "default"], "trainer.compile: 'default' is not supported on a sharded backbone"),
        (["--method", "full-finetune"], "method: 'full-finetune' trains the backbone"),
        (["--method", "ewc", "--strategy.base", "full-finetune"], "strategy.base: 'full-finetune' trains the backbone"),
    ],
)
def test_what_sharding_cannot_run_is_refused(overrides, message):
    config = load_config(RunConfig, ROOT / "configs/sequence/smoke.yaml", ["--trainer.strategy", "fsdp", *overrides])
    with pytest.raises(UserError, match=message + ".*; trainer.strategy: fsdp shards a frozen backbone"):
        check_shardable(config)


def test_generation_tasks_are_refused_under_sharding():
    config = load_config(RunConfig, ROOT / "configs/sequence/smoke.yaml", ["--trainer.strategy", "fsdp"])
    check_shardable(config, [SimpleNamespace(name="news", type="classification")])  # passes
    with pytest.raises(UserError, match="task 'summaries': generation decodes as many steps as its rows need"):
        check_shardable(config, [SimpleNamespace(name="summaries", type="generation")])
