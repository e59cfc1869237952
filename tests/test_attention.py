"""The fast (batched, re-associated) fusion path against the paper's equations written as a loop."""

import pytest
import torch
from conftest import randomize, tiny_backbone, tiny_batch

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.slot import AdapterSlot


def naive_fuse(self, fusion, adapters, h, residual):
    """Pfeiffer et al. 2021, Eq. 2-5 as written: one full d x d projection per adapter for keys and values."""
    x = self._adapter_input(adapters[-1].config.input, h, residual)
    query_input = h if fusion.config.query_before_ln else x
    q = fusion.query(query_input) if fusion.query is not None else query_input
    scores, values = [], []
    for adapter in adapters:
        v = adapter(x)  # a_n, (B, L, d)
        if fusion.config.residual_before:
            v = v + h
        k = fusion.key(v) if fusion.key is not None else v
        scores.append((q * k).sum(-1))
        values.append(fusion.value(v) if fusion.value is not None else v)
    scores = torch.stack(scores, -1)  # (B, L, K)
    scores = fusion.score_dropout(scores) if fusion.training and fusion.config.dropout > 0 else scores
    weights = torch.softmax(scores / fusion.temperature, -1)
    out = (weights.unsqueeze(-1) * torch.stack(values, 2)).sum(2)  # (B, L, d)
    return out if fusion.config.residual_before else out + h


def assert_fast_equals_naive(build, batch: dict, monkeypatch) -> None:
    """``build()`` -> a float64 model with an active fusion: logits and gradients of the fast path equal the
    per-adapter loop (:func:`naive_fuse`) within 1e-10."""

    def run():
        torch.manual_seed(0)
        model = build()
        logits = model(**batch)
        logits.pow(2).sum().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fast, fast_grads = run()
    with monkeypatch.context() as patch:
        patch.setattr(AdapterSlot, "_fuse", naive_fuse)
        naive, naive_grads = run()
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    assert fast_grads.keys() <= naive_grads.keys()  # b_K cancels in the softmax: the fast path never reads it
    for name, grad in naive_grads.items():
        torch.testing.assert_close(fast_grads.get(name, torch.zeros_like(grad)), grad, rtol=0, atol=1e-10)


def trainable_fusion(model: AdaptedModel) -> AdaptedModel:
    """float64, randomised, fusion "f" and its head training and active."""
    model.double()
    randomize(model, std=0.2)
    model.set_trainable(fusions=["f"], heads=["f"])
    model.activate(fusion="f", head="f")
    return model


def fused_model(k, placement, config):
    model = AdaptedModel(tiny_backbone())
    sources = [f"s{i}" for i in range(k)]
    for name in sources:
        model.add_adapter(name, AdapterConfig(placement=placement, reduction_factor=4))
    model.add_fusion("f", sources, config)
    model.add_head("f", 3)
    randomize(model, std=0.2)
    model.activate(fusion="f", head="f")
    model.set_trainable(fusions=["f"], heads=["f"])
    return model


def run(model, train_mode=False, seed=0):
    model.train(train_mode)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    logits = model(**tiny_batch())
    logits.pow(2).sum().backward()
    # b_K cancels in the softmax (it adds the same q . b_K to every score), so the fast path never reads it:
    # its gradient is None there and ~0 in the naive loop.
    grads = {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return logits.detach(), grads


CONFIGS = [
    FusionConfig(),
    FusionConfig(dropout=0.3),
    FusionConfig(residual_before=True, query_before_ln=True, dropout=0.3),
    FusionConfig(query=False),
    FusionConfig(key=False, value=False),
    FusionConfig(temperature=True),
    FusionConfig(value=False, regularization=False, value_initialized=False),  # AdapterHub's "static" config
]


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("config_index", range(len(CONFIGS)))
def test_fast_path_equals_naive_forward_and_gradients(k, placement, config_index, monkeypatch):
    model = fused_model(k, placement, CONFIGS[config_index])
    model.double()
    fast_logits, fast_grads = run(model)
    monkeypatch.setattr(AdapterSlot, "_fuse", naive_fuse)
    naive_logits, naive_grads = run(model)
    torch.testing.assert_close(fast_logits, naive_logits, rtol=1e-10, atol=1e-10)
    assert fast_grads.keys() == naive_grads.keys()
    assert any(".query." in n for n in fast_grads) == CONFIGS[config_index].query
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], naive_grads[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_dropout_in_training_mode_matches_naive_with_same_rng(placement, monkeypatch):
    model = fused_model(3, placement, FusionConfig(dropout=0.5, residual_before=True))
    model.double()
    fast_logits, fast_grads = run(model, train_mode=True, seed=7)
    monkeypatch.setattr(AdapterSlot, "_fuse", naive_fuse)
    naive_logits, naive_grads = run(model, train_mode=True, seed=7)
    torch.testing.assert_close(fast_logits, naive_logits, rtol=1e-10, atol=1e-10)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], naive_grads[name], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_single_source_with_identity_value_equals_the_adapter(placement):
    model = fused_model(1, placement, FusionConfig())
    for _, _, slot in model.slots():
        if "f" in slot.fusions:
            torch.nn.init.eye_(slot.fusions["f"].value.weight)
    model.eval()
    with torch.no_grad():
        fused = model.encode(**tiny_batch())
        model.activate(["s0"], head="f")
        single = model.encode(**tiny_batch())
    torch.testing.assert_close(fused, single, rtol=1e-5, atol=1e-5)


def test_value_starts_at_identity_and_regulariser():
    model = fused_model(2, "pfeiffer", FusionConfig())
    fresh = AdaptedModel(tiny_backbone())
    fresh.add_adapter("a", AdapterConfig(reduction_factor=4))
    fresh.add_fusion("f", ["a"], FusionConfig())
    fresh.activate(fusion="f")
    layer = next(s.fusions["f"] for _, _, s in fresh.slots() if "f" in s.fusions)
    torch.testing.assert_close(layer.value.weight, torch.eye(16), atol=1e-4, rtol=0)
    assert float(fresh.fusion_regularization()) < 1e-6
    assert float(model.fusion_regularization()) > 0  # randomized V is far from I


def test_temperature_is_set_from_outside_not_by_forward():
    model = fused_model(2, "pfeiffer", FusionConfig(temperature=True))
    layers = [s.fusions["f"] for _, _, s in model.slots() if "f" in s.fusions]
    assert all(layer.temperature == 50.0 for layer in layers)
    model.train()
    model(**tiny_batch())
    assert all(layer.temperature == 50.0 for layer in layers)
    model.set_fusion_temperature(2.0)
    assert all(layer.temperature == 2.0 for layer in layers)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_fused_attention_gradcheck(act):
    from adafuse.fusion.fastpath import FusedAttention

    generator = torch.Generator().manual_seed(0)
    k, r, d = 3, 2, 5
    rows = k * r

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    x = randn(2, 4, d).requires_grad_()
    down = randn(rows, d)  # frozen: no gradient asked
    m_t = randn(k * (r + 1), d).requires_grad_()
    down_b, score_b = randn(rows), randn(k * (r + 1)).requires_grad_()
    values = randn(k * (r + 1), d).requires_grad_()

    def fused(x, m_t, score_b, values):
        weight, bias = torch.cat([down, m_t]), torch.cat([down_b, score_b])
        return FusedAttention.apply(x, weight, bias, values, k, 0.7, act)[0]

    assert torch.autograd.gradcheck(fused, (x, m_t, score_b, values))


@pytest.mark.parametrize("act", ["gelu", "silu", "tanh"])
def test_fast_path_equals_naive_for_every_non_linearity(act, monkeypatch):
    model = AdaptedModel(tiny_backbone())
    for name in ("s0", "s1", "s2"):
        model.add_adapter(name, AdapterConfig(reduction_factor=4, non_linearity=act))
    model.add_fusion("f", ["s0", "s1", "s2"], FusionConfig(temperature=True))
    model.add_head("f", 3)
    randomize(model, std=0.2)
    model.set_fusion_temperature(3.0)
    model.activate(fusion="f", head="f")
    model.set_trainable(fusions=["f"], heads=["f"])
    model.double()
    fast_logits, fast_grads = run(model)
    monkeypatch.setattr(AdapterSlot, "_fuse", naive_fuse)
    naive_logits, naive_grads = run(model)
    torch.testing.assert_close(fast_logits, naive_logits, rtol=1e-10, atol=1e-10)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], naive_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def count_fast_calls(monkeypatch):
    from adafuse.fusion import fastpath

    calls = []
    original = fastpath.FusedAttention.apply
    monkeypatch.setattr(fastpath.FusedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize(
    "config, fast",
    [
        (FusionConfig(), True),
        (FusionConfig(residual_before=True, value=False), True),
        (FusionConfig(dropout=0.3), False),  # training with score dropout: the exact common terms are needed
        (FusionConfig(query_before_ln=True), False),
    ],
)
def test_which_path_runs(config, fast, monkeypatch):
    calls = count_fast_calls(monkeypatch)
    model = fused_model(2, "pfeiffer", config)
    run(model, train_mode=True)
    assert bool(calls) == fast
    calls.clear()
    model.set_trainable(adapters=["s0"], heads=["f"])  # a source being trained: plain autograd
    run(model, train_mode=True)
    assert not calls


@pytest.mark.parametrize("config_index", range(len(CONFIGS)))
def test_few_tokens_train_through_the_per_token_form_with_the_same_results(config_index, monkeypatch):
    """Below K(r+1) tokens a training step takes FusionLayer.forward_per_token (no per-step weight products);
    at inference, and above, the re-associated form: both equal the loop of Eq. 2-5."""
    from adafuse.fusion.attention import FusionLayer

    calls = []
    original = FusionLayer.forward_per_token
    monkeypatch.setattr(FusionLayer, "forward_per_token", lambda *a: calls.append(1) or original(*a))
    model = fused_model(2, "pfeiffer", CONFIGS[config_index]).double()  # K(r+1) = 2 * (4 + 1) = 10 rows
    few = {k: v[:1, :5] for k, v in tiny_batch().items()}  # 5 tokens
    for batch, per_token in ((few, True), (tiny_batch(), False)):  # 5 and 21 tokens
        calls.clear()
        model.train()
        torch.manual_seed(0)
        fast = model(**batch)
        fast.pow(2).sum().backward()
        fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert bool(calls) == per_token
        model.zero_grad(set_to_none=True)
        with monkeypatch.context() as patch:
            patch.setattr(AdapterSlot, "_fuse", naive_fuse)
            torch.manual_seed(0)
            naive = model(**batch)
            naive.pow(2).sum().backward()
        torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
        for name, grad in fast_grads.items():
            torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-8, atol=1e-10, msg=name)
        model.zero_grad(set_to_none=True)
    calls.clear()
    with torch.no_grad():
        model.eval()(**few)
    assert not calls  # inference: the memoised maps


def test_inference_maps_are_memoised_until_a_weight_changes(monkeypatch):
    model = fused_model(3, "pfeiffer", FusionConfig())
    model.eval()
    slots = [s for _, _, s in model.slots() if "f" in s.fusions]
    layers = [s.fusions["f"] for s in slots]
    made = []
    original = type(layers[0]).score_map
    monkeypatch.setattr(type(layers[0]), "score_map", lambda self, up: made.append(1) or original(self, up))
    with torch.inference_mode():
        first = model(**tiny_batch())
        assert len(made) == len(layers)
        assert torch.equal(model(**tiny_batch()), first)
        assert len(made) == len(layers)  # reused
    with torch.no_grad():
        layers[0].query.weight.add_(0.5)  # what an optimizer step does
        slots[1].adapters["s1"].up.weight.mul_(2.0)  # a source reloaded in another layer
        changed = model(**tiny_batch())
    assert len(made) == 2 * len(layers)
    reference = fused_model(3, "pfeiffer", FusionConfig())
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(changed, reference(**tiny_batch()))
        made.clear()
        model.double()  # new storage, same parameters: recomputed in float64
        assert model(**tiny_batch()).dtype == torch.float64
    assert len(made) == len(layers)
    model.float()
    model.train()
    logits, grads = run(model)  # with autograd the maps are formed every step and get gradients
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".query.weight" in n)


def test_each_fusion_keeps_its_own_maps_and_deleting_drops_them(monkeypatch):
    model = fused_model(3, "pfeiffer", FusionConfig())
    model.add_fusion("g", ["s0", "s2"], FusionConfig())
    randomize(model, std=0.2)
    model.eval()
    slots = [s for _, _, s in model.slots() if "f" in s.fusions]
    batch = tiny_batch()
    with torch.inference_mode():
        model.activate(fusion="f", head="f")
        first = model(**batch)
        model.activate(fusion="g", head="f")
        model(**batch)
        assert all(
            {fusion for _, fusion in slot._maps_memo} == {slot.fusions["f"], slot.fusions["g"]} for slot in slots
        )
        model.activate(fusion="f", head="f")
        assert torch.equal(model(**batch), first)  # f's maps survived g's pass
    model.delete_fusion("g")
    assert all(not slot._maps_memo for slot in slots)


def test_stacked_sources_are_kept_across_training_steps_and_inference_mode(monkeypatch):
    """The frozen sources are stacked once (also when first needed under inference mode, as validation does)
    and reused by later training steps, whose results equal a model that never memoised anything."""
    from adafuse.fusion import slot as slot_module

    stacked = []
    original = slot_module.stack_adapters
    monkeypatch.setattr(slot_module, "stack_adapters", lambda adapters: stacked.append(1) or original(adapters))
    model = fused_model(3, "pfeiffer", FusionConfig())
    model.eval()
    with torch.inference_mode():
        model(**tiny_batch())
    layers = len(stacked)
    _, grads = run(model, train_mode=False)
    _, again = run(model, train_mode=False)
    assert len(stacked) == layers  # stacked under inference mode, reused with autograd, twice
    fresh = fused_model(3, "pfeiffer", FusionConfig())
    fresh.load_state_dict(model.state_dict())
    _, reference = run(fresh, train_mode=False)
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad) and torch.equal(again[name], grad), name
