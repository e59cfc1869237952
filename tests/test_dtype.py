"""``backbone.dtype``: frozen weights in bfloat16 beside float32 adapters, fusion and heads; one fingerprint for
every dtype of the same weights; float16 refused off CUDA."""

import json
import os

import pytest
import torch
from conftest import ROOT, TINY, bare_hidden, tiny_batch

from adafuse.continual.cli import main
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.backbone import BackboneConfig, load_model
from adafuse.fusion.errors import UserError
from adafuse.fusion.fingerprint import fingerprint
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.quantize import is_quantized

KINDS = {
    "bottleneck": AdapterConfig(reduction_factor=2),
    "parallel": AdapterConfig(kind="parallel", reduction_factor=2),
    "compacter": AdapterConfig(kind="compacter", reduction_factor=2, phm_dim=2),
    "lora": AdapterConfig(kind="lora", r=4),
    "prefix": AdapterConfig(kind="prefix", prefix_length=3),
}
CASES = [("bert", kind) for kind in KINDS] + [("bert", "fusion")]
CASES += [(m, s) for m in ("gpt2", "llama", "t5") for s in ("bottleneck", "fusion")] + [("llama", "lora")]


def _config(model_type: str, dtype: str) -> BackboneConfig:
    return BackboneConfig(random_init={"model_type": model_type, **TINY[model_type]}, dtype=dtype)


def adapted_model(model_type: str, setup: str, dtype: str) -> AdaptedModel:
    model = _adapted(AdaptedModel(load_model(_config(model_type, dtype))), setup)
    with torch.no_grad():  # trained-looking: every delta non-zero, the sources' too
        for name, param in model.named_parameters():
            if any(part in name for part in (".adapters.", ".fusions.", "heads.")):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _adapted(model: AdaptedModel, setup: str) -> AdaptedModel:
    """An adapter of ``setup``'s kind (or three sources and a fusion) and a head, active and training."""
    torch.manual_seed(0)
    sources = ["s0", "s1", "s2"] if setup == "fusion" else ["a"]
    for name in sources:
        model.add_adapter(name, KINDS.get(setup, KINDS["bottleneck"]))
    if setup == "fusion":
        model.add_fusion("f", sources, FusionConfig())
    model.add_head("h", 3)
    model.activate(**({"fusion": "f"} if setup == "fusion" else {"adapters": ["a"]}), head="h")
    model.set_trainable(**({"fusions": ["f"]} if setup == "fusion" else {"adapters": ["a"]}), heads=["h"])
    return model


@pytest.mark.parametrize(("model_type", "setup"), CASES)
def test_bfloat16_weights_give_the_float32_outputs_within_bf16_rounding(model_type, setup):
    wide, narrow = (adapted_model(model_type, setup, dtype) for dtype in ("float32", "bfloat16"))
    added = (".adapters.", ".fusions.", "heads.")
    frozen = {p.dtype for n, p in narrow.named_parameters() if not any(a in n for a in added)}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for n, p in narrow.named_parameters() if any(a in n for a in added)} == {torch.float32}
    batch = tiny_batch()
    wide.eval(), narrow.eval()
    with torch.no_grad():
        expected, got = wide(**batch), narrow(**batch)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: every weight and activation rounded at 2^-9 relative, a few layers deep
    assert (got - expected).norm() <= 0.05 * expected.norm()

    narrow.train()
    loss = torch.nn.functional.cross_entropy(narrow(**batch), torch.tensor([0, 1, 2]))
    loss.backward()
    graded = {n for n, p in narrow.named_parameters() if p.grad is not None}
    assert graded and graded <= {n for n, p in narrow.named_parameters() if p.requires_grad}  # (W_K's bias cancels)
    assert all(any(a in n for a in added) for n in graded)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_a_new_adapter_on_a_bfloat16_backbone_is_inert(model_type):
    model = AdaptedModel(load_model(_config(model_type, "bfloat16")))
    batch = tiny_batch()
    expected = bare_hidden(model.backbone, batch).float()
    model.add_adapter("a", AdapterConfig(reduction_factor=2))
    model.activate(adapters=["a"])
    with torch.no_grad():
        assert torch.equal(model.encode(**batch), expected)


def test_the_fingerprint_names_the_weights_not_their_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for model_type in ("roberta", "llama", "t5"):
        built = fingerprint(load_model(_config(model_type, "float32")))
        assert fingerprint(load_model(_config(model_type, "bfloat16"))) == built  # random init: hashed at build
        saved = tmp_path / model_type
        load_model(_config(model_type, "float32")).save_pretrained(saved)
        for dtype in ("float32", "bfloat16"):
            assert fingerprint(load_model(BackboneConfig(name=str(saved), dtype=dtype))) == built, (model_type, dtype)
    other = load_model(_config("llama", "float32"))
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert fingerprint(other) != built


def test_the_checkpoint_fingerprint_is_cached_and_read_again_when_a_file_changes(tmp_path, monkeypatch):
    from adafuse.fusion import fingerprint as module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    saved = tmp_path / "saved"
    load_model(_config("llama", "float32")).save_pretrained(saved)
    config = BackboneConfig(name=str(saved), dtype="bfloat16")
    first = fingerprint(load_model(config))
    reads = []
    original = module._stored_tensors
    monkeypatch.setattr(module, "_stored_tensors", lambda *a: reads.append(1) or original(*a))
    assert fingerprint(load_model(config)) == first and reads == []  # from the cache
    weights = saved / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert fingerprint(load_model(config)) == first and reads == [1]  # same bytes, read again


def test_float16_off_cuda_unknown_values_and_unshardable_backbones_are_refused_in_one_line(capsys, tmp_path):
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        load_model(_config("bert", "float16"), "cpu")
    # a training job loads on the CPU for Lightning to move: its accelerator is checked instead (below)
    assert load_model(_config("bert", "float16")).dtype == torch.float16
    smoke = str(ROOT / "configs" / "sequence" / "smoke.yaml")
    cases = [
        ("backbone.dtype", "float16", "float16 needs a CUDA device", []),
        ("backbone.dtype", "float8", "is not one of", []),
        ("backbone.quantization", "int3", "is not one of", []),
        ("trainer.strategy", "deepspeed", "is not one of auto, ddp, fsdp", []),
        ("backbone.quantization", "int8", "not plain tensors to shard", ["--trainer.strategy", "fsdp"]),
    ]
    for key, value, message, more in cases:
        out = tmp_path / value
        assert main(["run", smoke, "--out", str(out), f"--{key}", value, *more]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and message in err[0]
        assert not out.exists()


def test_a_bfloat16_sequence_measures_bwt_zero_and_its_library_loads_in_float32(tmp_path):
    from adafuse.continual.jobs.library_model import LibraryModel

    smoke = str(ROOT / "configs" / "sequence" / "smoke.yaml")
    out = tmp_path / "run"
    args = ["--tasks", "[bbc-business, bbc-tech]", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1"]
    assert main(["run", smoke, "--out", str(out), "--backbone.dtype", "bfloat16", *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bwt"] == 0.0 and metrics["forgetting"] == 0.0
    manifest = json.loads((out / "library" / "manifest.json").read_text())
    assert manifest["backbone"]["config"]["dtype"] == "bfloat16"
    wide = tmp_path / "float32.yaml"
    wide.write_text(json.dumps({**manifest["backbone"]["config"], "dtype": "float32"}))
    opened = LibraryModel.open(out / "library", backbone=str(wide))  # the fingerprint check passes
    opened.load_adapter("bbc-business")
    assert opened.model.backbone.dtype == torch.float32


QUANTIZED = [("llama", "int8", kind) for kind in ("bottleneck", "lora", "fusion")]
QUANTIZED += [("llama", "nf4", kind) for kind in ("bottleneck", "lora", "fusion")] + [("bert", "int8", "prefix")]


@pytest.mark.parametrize(("model_type", "mode", "setup"), QUANTIZED)
def test_quantized_backbones_train_every_kind_and_keep_the_fingerprint(model_type, mode, setup):
    pytest.importorskip("torchao")
    config = BackboneConfig(random_init={"model_type": model_type, **TINY[model_type]}, quantization=mode)
    backbone = load_model(config)
    assert fingerprint(backbone) == fingerprint(load_model(_config(model_type, "float32")))
    projections = [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert projections and all(is_quantized(m.weight) for m in projections)
    wide, narrow = adapted_model(model_type, setup, "float32"), _adapted(AdaptedModel(backbone), setup)
    narrow.load_state_dict({k: v for k, v in wide.state_dict().items() if not k.startswith("backbone.") or
                            ".adapters." in k or ".fusions." in k}, strict=False)  # fmt: skip
    batch = tiny_batch()
    wide.eval(), narrow.eval()
    with torch.no_grad():
        expected, got = wide(**batch), narrow(**batch)
    assert (got - expected).norm() <= (0.05 if mode == "int8" else 0.5) * expected.norm()  # nf4: 16 levels
    narrow.train()
    torch.nn.functional.cross_entropy(narrow(**batch), torch.tensor([0, 1, 2])).backward()
    graded = {n for n, p in narrow.named_parameters() if p.grad is not None}
    assert graded and graded <= {n for n, p in narrow.named_parameters() if p.requires_grad}


def test_an_int8_projection_keeps_its_int8_weight_for_the_backward_pass():
    """Not the dequantized copy torchao's linear hands autograd (the whole weight again, for the whole step); the
    outputs and input gradients are torchao's own, bit for bit."""
    pytest.importorskip("torchao")
    from adafuse.fusion.quantize import quantize

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        layers = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).to(dtype)
        layers.requires_grad_(False)
        assert quantize(layers, "int8") == 2
        x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
        kept: list[torch.Tensor] = []

        def keep(tensor, kept=kept):
            kept.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = layers(x)
        assert [t.shape for t in kept if is_quantized(t)] == [(64, 32), (16, 64)]
        assert all(t.shape != (32, 64) and t.shape != (64, 16) for t in kept if not is_quantized(t))  # no copies
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
        for layer in (layers[0], layers[2]):  # torchao's linear as it is
            layer.forward = torch.nn.Linear.forward.__get__(layer)
        plain = layers(x)
        (plain_grad,) = torch.autograd.grad(plain.float().square().sum(), x)
        assert torch.equal(out, plain) and torch.equal(grad, plain_grad), dtype


def test_quantization_refusals_are_one_line(capsys, tmp_path):
    pytest.importorskip("torchao")
    with pytest.raises(UserError, match="Conv1D"):
        load_model(BackboneConfig(random_init={"model_type": "gpt2", **TINY["gpt2"]}, quantization="int8"))
    with pytest.raises(UserError, match="is not one of"):
        BackboneConfig(quantization="int3")
    model = AdaptedModel(load_model(BackboneConfig(random_init={"model_type": "llama", **TINY["llama"]},
                                                   quantization="int8")))  # fmt: skip
    model.add_adapter("a", KINDS["lora"])
    with pytest.raises(UserError, match="quantized"):
        model.merge_adapter("a")


def test_bf16_projections_multiply_in_float32_on_a_cpu_without_bf16(monkeypatch):
    import torch.nn.functional as F

    from adafuse.fusion import widen

    monkeypatch.setattr(widen, "CPU_WIDENS", True)
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    assert widen.widen_bf16_linears(torch.nn.Sequential(linear)) == 1
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    out = linear(x)
    assert out.dtype == torch.bfloat16
    exact = F.linear(x.detach().float(), linear.weight.float(), linear.bias.float())
    assert torch.equal(out, exact.to(torch.bfloat16))  # the float32 product, rounded once
    out.float().sum().backward()
    assert torch.equal(x.grad, linear.weight.float().sum(0).expand(3, -1).to(torch.bfloat16))
    monkeypatch.setattr(widen, "CPU_WIDENS", False)  # hardware with bf16 matmuls: the projection's own
    assert torch.equal(linear(x.detach()), F.linear(x.detach(), linear.weight, linear.bias))
