"""Greedy decoding with a key/value cache gives the tokens of decoding without one (every step reading the whole
sequence again): on decoders and T5, for every adapter kind a decoder takes, fusion and per-row routes."""

import pytest
import torch
from conftest import tiny_backbone

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.tasks.types.generation import decode

KINDS = {
    "bottleneck": AdapterConfig(reduction_factor=2),
    "parallel": AdapterConfig(kind="parallel", reduction_factor=2),
    "compacter": AdapterConfig(kind="compacter", reduction_factor=2, phm_dim=2),
    "lora": AdapterConfig(kind="lora", r=4),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # ragged: left padding on decoders


def _model(model_type: str, setup: str) -> AdaptedModel:
    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone(model_type))
    sources = ["s0", "s1", "s2"] if setup in ("fusion", "routes") else ["a"]
    for name in sources:
        model.add_adapter(name, KINDS.get(setup, KINDS["bottleneck"]))
    if setup in ("fusion", "routes"):
        model.add_fusion("f", sources, FusionConfig())
    model.add_head("lm", head_type=model.sites.lm)
    model.double().eval()
    with torch.no_grad():  # trained-looking: every delta non-zero, and an end token that rows reach
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    if setup == "routes":
        model.route({"f": torch.tensor([0, 2]), "s1": torch.tensor([1])})
        model.active_head = "lm"
    elif setup == "fusion":
        model.activate(fusion="f", head="lm")
    else:
        model.activate(adapters=["a"], head="lm")
    return model


# every kind a decoder takes on Llama (GPT-2 has no LoRA targets: c_attn fuses q, k, v); fusion and routes on all
CASES = [("llama", kind) for kind in KINDS] + [(m, s) for m in ("gpt2", "t5") for s in ("bottleneck", "fusion")]
CASES += [(m, s) for m in ("gpt2", "llama", "t5") for s in ("fusion", "routes") if (m, s) not in CASES]


@pytest.mark.parametrize(("model_type", "setup"), CASES)
def test_cached_decoding_gives_the_uncached_tokens(model_type, setup):
    model = _model(model_type, setup)
    cached = decode(model, PROMPTS, 12, end=3)
    plain = decode(model, PROMPTS, 12, end=3, cache=False)
    assert cached == plain
    assert len({tuple(row) for row in plain}) > 1 and max(map(len, plain)) > 4  # rows differ and decode far


@pytest.mark.parametrize("model_type", ["llama", "t5"])
def test_decoding_runs_on_a_bfloat16_backbone_with_float32_adapters(model_type):
    """The encoder's states reach T5's cross-attention in the backbone's dtype; cached = uncached there too."""
    from conftest import TINY

    from adafuse.fusion.backbone import BackboneConfig, load_model

    model = AdaptedModel(load_model(BackboneConfig(random_init={"model_type": model_type, **TINY[model_type]},
                                                   dtype="bfloat16")))  # fmt: skip
    model.add_adapter("a", KINDS["bottleneck"])
    model.add_head("lm", head_type=model.sites.lm)
    model.activate(adapters=["a"], head="lm")
    model.eval()
    cached = decode(model, PROMPTS, 6, end=3)
    assert cached == decode(model, PROMPTS, 6, end=3, cache=False) and len(cached) == len(PROMPTS)


def test_the_cache_reads_one_new_token_per_step():
    model = _model("gpt2", "bottleneck")
    widths = []
    handle = model.backbone.wte.register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    decode(model, PROMPTS, 5, end=-1)
    handle.remove()
    assert widths == [6, 1, 1, 1, 1]
