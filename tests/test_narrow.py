"""A narrow backbone keeps narrow activations for the backward pass: its RMS norms and the adapters' float32
region save their bfloat16 inputs and recompute, with outputs and gradients bit-identical to keeping the
float32 copies."""

import pytest
import torch
from conftest import tiny_batch
from test_dtype import CASES, adapted_model

import adafuse.fusion.narrow as narrow


def _plain(function, *args):
    return function(*args)


def _step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks
    logits = model(**tiny_batch())
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("model_type", "setup"), CASES)
def test_recomputing_gives_the_gradients_of_keeping_the_float32_copies(model_type, setup, monkeypatch):
    model = adapted_model(model_type, setup, "bfloat16")
    logits, grads = _step(model)
    monkeypatch.setattr(narrow, "recompute_in_backward", _plain)  # float32 copies kept, as autograd alone keeps
    kept_logits, kept_grads = _step(model)
    assert torch.equal(logits, kept_logits)
    assert grads.keys() == kept_grads.keys() and grads
    assert all(torch.equal(grads[n], kept_grads[n]) for n in grads)


@pytest.mark.parametrize(("model_type", "setup"), [("llama", "bottleneck"), ("llama", "lora"), ("t5", "fusion")])
def test_no_float32_activation_is_kept_for_the_backward_pass(model_type, setup, monkeypatch):
    model = adapted_model(model_type, setup, "bfloat16").train()

    def saved() -> list[tuple[torch.dtype, tuple[int, ...]]]:
        kept = []

        def pack(tensor):
            kept.append((tensor.dtype, tuple(tensor.shape)))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**tiny_batch()).sum()
        return kept

    def float32_hidden(kept) -> list[tuple[int, ...]]:
        return [s for dtype, s in kept if dtype == torch.float32 and s[:2] == (3, 7) and s[-1] == model.hidden_size]

    kept = saved()
    assert float32_hidden(kept) == []  # float32 by design: the head's pooled (B, d) input, its (B, L, 1) mask
    assert any(dtype == torch.bfloat16 and shape[:2] == (3, 7) for dtype, shape in kept)
    monkeypatch.setattr(narrow, "recompute_in_backward", _plain)
    assert float32_hidden(saved())  # what autograd alone keeps: the check above can fail


def test_norms_of_a_float32_backbone_are_left_alone():
    model = adapted_model("llama", "bottleneck", "float32")
    assert not any("forward" in vars(m) for m in model.backbone.modules() if type(m).__name__.endswith("RMSNorm"))
    narrowed = adapted_model("llama", "bottleneck", "bfloat16")
    assert all("forward" in vars(m) for m in narrowed.backbone.modules() if type(m).__name__.endswith("RMSNorm"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_routed_rows_are_widened_per_route_and_match_each_name_alone(dtype):
    """Rows of two adapters, a fusion and no route in one pass: each row as its own name computes it, and the
    in-place writes of a pass without a graph give what a training pass's copies give."""
    model = adapted_model("llama", "fusion", dtype)  # sources s0-s2 and fusion f
    model.eval()
    batch = tiny_batch(batch=4)
    routes = {"s0": torch.tensor([0]), "f": torch.tensor([1, 3]), "s2": torch.tensor([2])}
    expected = []
    with torch.no_grad():
        for name, rows in routes.items():
            model.activate(**({"fusion": name} if name == "f" else {"adapters": [name]}))
            expected.append((rows, model.encode(**batch)[rows]))
        model.route(routes)
        routed = model.encode(**batch)
    with torch.enable_grad():
        recorded = model.encode(**batch)
    adapter_rows = torch.tensor([0, 2])  # exactly; a fusion with a graph may take its per-token form
    assert torch.equal(routed[adapter_rows], recorded.detach()[adapter_rows])
    torch.testing.assert_close(routed, recorded.detach(), rtol=0, atol=1e-5 if dtype == "float32" else 2e-2)
    for rows, rows_alone in expected:
        torch.testing.assert_close(routed[rows], rows_alone, rtol=0, atol=1e-5 if dtype == "float32" else 2e-2)
