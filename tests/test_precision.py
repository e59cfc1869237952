"""The fusion fast path under autocast (bf16, fp16), against float64.

Tolerances, derived: with unit roundoff u (bf16 2^-8, fp16 2^-11) and float32 accumulation, a matmul whose two
inputs are rounded once has a normwise relative error of at most about 2u. The forward pass chains two matmuls
(x [D; M^T]^T, then mix V~), the second's inputs rounded again: at most 4u on o and on s. The backward pass adds
the rounding of the incoming gradient and of grad z before its matmuls: at most 8u on every gradient. Measured
on the sizes below: 1.6u forward and 2.9u backward. The bound holds for smooth non-linearities; with ReLU a
pre-activation within rounding of 0 flips its derivative (in any low-precision implementation), so ReLU is
checked at the model level only.
"""

import json

import pytest
import torch
from cli_process import group_ranks
from conftest import randomize, tiny_batch
from test_attention import count_fast_calls, fused_model

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.fastpath import FusedAttention
from adafuse.fusion.kinds import AdapterConfig

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fused_attention_runs(dtype, act: str, seed: int):
    """Outputs and gradients of FusedAttention with matmuls in ``dtype`` (float32 inputs) and in float64."""
    generator = torch.Generator().manual_seed(seed)
    k, r, d = 8, 4, 64
    rows = k * r

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    inputs = (randn(4, 32, d), randn(rows + k * (r + 1), d, scale=d**-0.5), randn(rows + k * (r + 1), scale=0.1))
    inputs += (randn(k * (r + 1), d, scale=rows**-0.5),)
    grad_out = randn(4, 32, d)

    def run(matmul_dtype, input_dtype):
        leaves = [t.to(input_dtype).requires_grad_() for t in inputs]
        out, weights = FusedAttention.apply(*leaves, k, 1.0, act, matmul_dtype)
        out.backward(grad_out.to(out.dtype))
        assert all(leaf.grad.dtype == input_dtype for leaf in leaves)  # each gradient in its input's dtype
        return [out, weights] + [leaf.grad for leaf in leaves]

    return run(dtype, torch.float32), run(None, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu", "tanh"])
def test_fused_attention_in_low_precision_is_within_the_derived_bound(dtype, act):
    u = UNIT_ROUNDOFF[dtype]
    for seed in range(3):
        low, reference = fused_attention_runs(dtype, act, seed)
        assert low[0].dtype == dtype and low[1].dtype == torch.float32  # o from the matmul, s in float32
        for name, a, b in zip(["o", "s"], low[:2], reference[:2], strict=True):
            assert relative(a, b) <= 4 * u, name
        for name, a, b in zip(["x", "weight", "bias", "values"], low[2:], reference[2:], strict=True):
            assert relative(a, b) <= 8 * u, name


def test_low_precision_matmuls_really_run_in_the_low_dtype():
    """Float32 matmuls would beat the bound by orders of magnitude: the error must be of the order of u."""
    low, reference = fused_attention_runs(torch.bfloat16, "gelu", 0)
    assert relative(low[0], reference[0]) > UNIT_ROUNDOFF[torch.bfloat16] / 16


def flat(grads: dict) -> torch.Tensor:
    """All gradients as one vector: a per-tensor error is dominated by tensors whose gradient is nearly zero."""
    return torch.cat([grads[name].flatten().double().cpu() for name in sorted(grads)])


def autocast_step(model, dtype, scaler=None):
    """One forward/backward under CPU autocast; the fusion's gradients (unscaled) in float32."""
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=dtype):
        logits = model(**tiny_batch())
    loss = logits.float().pow(2).sum()
    (scaler.scale(loss) if scaler else loss).backward()
    scale = scaler.get_scale() if scaler else 1.0
    return logits, {n: p.grad / scale for n, p in model.named_parameters() if p.grad is not None}


def reference_step(model):
    reference = fused_model(2, "pfeiffer", FusionConfig())
    reference.load_state_dict(model.state_dict())
    reference.double().eval()
    logits = reference(**tiny_batch())
    logits.pow(2).sum().backward()
    return logits, {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}


def test_bf16_autocast_runs_the_fast_path_on_the_whole_model(monkeypatch):
    calls = count_fast_calls(monkeypatch)
    torch.manual_seed(0)
    model = fused_model(2, "pfeiffer", FusionConfig())
    model.eval()  # no dropout, so the runs compare
    logits, grads = autocast_step(model, torch.bfloat16)
    assert calls  # the hand-written pass, not autograd
    ref_logits, ref_grads = reference_step(model)
    # the backbone runs in bf16 here too (two layers and a head): 8u on the logits and on all the gradients
    # (measured over seeds 0-5: at most 1.7u and 2.0u)
    assert relative(logits, ref_logits) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]
    assert grads.keys() == ref_grads.keys()
    assert relative(flat(grads), flat(ref_grads)) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]


def test_fp16_autocast_with_a_gradient_scaler(monkeypatch):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    except (RuntimeError, AttributeError) as error:  # an older torch without CPU fp16 autocast
        pytest.skip(f"fp16 autocast unsupported here: {error}")
    calls = count_fast_calls(monkeypatch)
    torch.manual_seed(0)
    model = fused_model(2, "pfeiffer", FusionConfig())
    model.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _, grads = autocast_step(model, torch.float16, scaler)
    assert calls
    _, ref_grads = reference_step(model)
    assert torch.isfinite(flat(grads)).all()
    assert relative(flat(grads), flat(ref_grads)) <= 8 * UNIT_ROUNDOFF[torch.float16]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_bf16_on_a_cpu_without_bf16_is_refused_in_one_line(monkeypatch):
    from adafuse.continual.config import TrainerConfig
    from adafuse.continual.runtime import hardware
    from adafuse.fusion.errors import UserError

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="trainer.precision: 'bf16-mixed' needs a CPU with bf16"):
        TrainerConfig(precision="bf16-mixed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    TrainerConfig(precision="bf16-mixed", accelerator="gpu")  # the GPU decides for itself
    TrainerConfig(precision="32-true")
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    TrainerConfig(precision="bf16-mixed")


def test_gpu_accelerator_without_a_gpu_is_one_line_exit_2(tmp_path):
    from test_cli import run_cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    result = run_cli("run", "configs/sequence/smoke.yaml", "--out", str(tmp_path / "x"), "--trainer.accelerator", "gpu")
    assert result.returncode == 2
    assert "trainer.accelerator: 'gpu' needs a CUDA device; none is visible here" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from adafuse.continual.runtime import hardware

    assert isinstance(hardware.cpu_has_bf16(), bool)
    assert hardware.BF16_FLAGS == ("avx512_bf16", "amx_bf16")


# ---- on a CUDA device (skipped elsewhere) ------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_bf16_fast_path_within_the_bound(monkeypatch):
    calls = count_fast_calls(monkeypatch)
    torch.manual_seed(0)
    model = fused_model(2, "pfeiffer", FusionConfig())
    ref_logits, ref_grads = reference_step(model)
    model.eval().cuda()
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**batch)
    logits.float().pow(2).sum().backward()
    assert calls
    assert relative(logits.cpu(), ref_logits) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert relative(flat(grads), flat(ref_grads)) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]


@pytest.mark.cuda
def test_cuda_library_loads_and_routes_on_the_device(tmp_path):
    """The backbone is loaded onto the GPU directly; routed (mixed-task) prediction keeps its rows there."""
    from conftest import tiny_backbone

    from adafuse.continual.jobs.library_model import LibraryModel
    from adafuse.fusion.backbone import BackboneConfig, load_model

    backbone = tiny_backbone()
    backbone.save_pretrained(tmp_path / "bb")
    model = load_model(BackboneConfig(name=str(tmp_path / "bb")), "cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert LibraryModel  # opened with device= in predict (tests/test_predict.py covers the CPU side)
    from adafuse.fusion.model import AdaptedModel

    adapted = AdaptedModel(model)
    for name in ("a", "b"):
        adapted.add_adapter(name, AdapterConfig(reduction_factor=4))
        adapted.add_head(name, 3)
    randomize(adapted, std=0.2)
    adapted.cuda().eval()
    batch = {k: v.cuda() for k, v in tiny_batch(batch=4).items()}
    rows = {"a": torch.tensor([0, 2], device="cuda"), "b": torch.tensor([1, 3], device="cuda")}
    adapted.route(rows)
    with torch.no_grad():
        hidden = adapted.encode(**batch)
    assert hidden.device.type == "cuda"
    for task, index in rows.items():
        adapted.route({})
        adapted.activate([task])
        with torch.no_grad():
            alone = adapted.encode(**batch)
        torch.testing.assert_close(hidden[index], alone[index], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smoke_sequence_in_bf16_mixed_on_the_cpu(tmp_path):
    """Lightning's bf16-mixed end to end (autocast, the fast path, the optimizer with clipping): the monitor
    still measures BWT = 0.0 for isolated adapters."""
    from test_cli import run_cli

    from adafuse.continual.runtime.hardware import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (refused: tested above)")
    out = tmp_path / "run"
    result = run_cli("run", "configs/sequence/smoke.yaml", "--out", str(out), "--trainer.precision", "bf16-mixed")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bwt"] == 0.0 and metrics["acc"] > 0.6  # better than chance on the binary tasks


def _ddp_rank(rank: int, world: int, out: str) -> None:
    """One gloo rank: the same fusion model, its share of the batch, bf16 autocast, DDP's gradient averaging."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = fused_model(2, "pfeiffer", FusionConfig())
    model.eval()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # b_K never enters the fast path
    batch = {k: v[rank::world] for k, v in tiny_batch(batch=4).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ddp(**batch)
    logits.float().pow(2).sum().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)


@pytest.mark.slow
def test_ddp_reduces_bf16_fusion_gradients_like_one_process(tmp_path):
    """Under bf16-mixed the fusion's gradients are float32 (its parameters are) and DDP's all-reduce (gloo here,
    NCCL on GPUs: the same code path) averages them: world x the mean equals the one-process gradient of the
    whole batch within the bf16 bound."""
    out = str(tmp_path / "grads.pt")
    group_ranks(_ddp_rank, 2, out)
    reduced = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = fused_model(2, "pfeiffer", FusionConfig())
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**tiny_batch(batch=4))
    logits.float().pow(2).sum().backward()
    whole = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert reduced.keys() == whole.keys()
    assert all(g.dtype == torch.float32 for g in reduced.values())
    assert relative(flat({n: 2 * g for n, g in reduced.items()}), flat(whole)) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]
