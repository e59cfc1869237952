"""``trainer.activation_checkpointing``: each block's forward (adapters and fusion inside it) is recomputed in the
backward pass, and the gradients are exactly those of the plain step (float64, dropout on, every kind and fusion)."""

import pytest
import torch
from conftest import tiny_backbone, tiny_batch

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel

KINDS = {
    "bottleneck": AdapterConfig(reduction_factor=2),
    "parallel": AdapterConfig(kind="parallel", reduction_factor=2),
    "compacter": AdapterConfig(kind="compacter", reduction_factor=2, phm_dim=2),
    "lora": AdapterConfig(kind="lora", r=4, dropout=0.1),
    "prefix": AdapterConfig(kind="prefix", prefix_length=3, dropout=0.1),
}


def _model(model_type: str, setup: str) -> AdaptedModel:
    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone(model_type)).double()
    if setup == "fusion":
        for name in ("s0", "s1", "s2"):
            model.add_adapter(name, AdapterConfig(reduction_factor=2))
        model.add_fusion("f", ["s0", "s1", "s2"], FusionConfig(dropout=0.1))
        trainable, active = {"fusions": ["f"]}, {"fusion": "f"}
    else:
        model.add_adapter("a", KINDS[setup])
        trainable, active = {"adapters": ["a"]}, {"adapters": ["a"]}
    model.add_head("h", 3, dropout=0.1)
    model.double()
    with torch.no_grad():  # trained-looking: every delta non-zero
        for param in model.parameters():
            if param.requires_grad or param.dtype == torch.float64:
                param.add_(torch.randn_like(param) * 0.02)
    model.activate(**active, head="h")
    model.set_trainable(**trainable, heads=["h"])
    return model


def _gradients(model: AdaptedModel, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays them in the recompute)
    logits = model(batch["input_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])) + model.fusion_regularization()
    loss.backward()
    # T5 classifies with its encoder: its decoder's fusion layers get no gradient, checkpointed or not
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("setup", [*KINDS, "fusion"])
def test_checkpointed_gradients_equal_the_plain_ones(setup):
    model = _model("bert", setup)
    batch = tiny_batch()
    plain = _gradients(model, batch)
    calls = []
    inner = next(model.blocks[1].children())
    handle = inner.register_forward_hook(lambda *_: calls.append(1))
    model.set_activation_checkpointing(True)
    checkpointed = _gradients(model, batch)
    handle.remove()
    assert len(calls) == 2  # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5", "distilbert"])
def test_checkpointing_on_other_architectures(model_type):
    model = _model(model_type, "fusion")
    batch = tiny_batch()
    plain = _gradients(model, batch)
    model.set_activation_checkpointing(True)
    checkpointed = _gradients(model, batch)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-12, msg=name)


def test_evaluation_is_unaffected_and_it_can_be_turned_off():
    model = _model("bert", "bottleneck")
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        before = model(batch["input_ids"], batch["attention_mask"])
    model.set_activation_checkpointing(True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), before)
    model.set_activation_checkpointing(False)
    model.train()
    assert not any(block.training for block in model.blocks)  # the frozen backbone runs in eval mode again


def test_a_checkpointed_run_measures_what_a_plain_run_does(tmp_path):
    import json
    from pathlib import Path

    from adafuse.continual.cli import main

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "sequence" / "smoke.yaml")
    args = [
        "run",
        smoke,
        "--tasks",
        "[bbc-business, bbc-tech]",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
    ]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "checkpointed"), "--trainer.activation_checkpointing", "true"]) == 0
    plain, checkpointed = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("plain", "checkpointed"))
    assert checkpointed["accuracy_matrix"] == plain["accuracy_matrix"]
