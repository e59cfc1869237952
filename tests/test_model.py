import copy
import pickle

import pytest
import torch
from conftest import TINY, bare_hidden, randomize, tiny_backbone, tiny_batch

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel


def _bare_hidden(model_type):
    return bare_hidden(tiny_backbone(model_type), tiny_batch())


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_new_adapter_is_identity(model_type, placement):
    expected = _bare_hidden(model_type)
    model = AdaptedModel(tiny_backbone(model_type))
    model.add_adapter("a", AdapterConfig(placement=placement, reduction_factor=4))
    model.activate(["a"])
    model.eval()
    with torch.no_grad():
        hidden = model.encode(**tiny_batch())
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)
    model.activate([])
    with torch.no_grad():
        assert torch.equal(model.encode(**tiny_batch()), expected)  # nothing active: exactly the bare backbone


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_trained_adapter_changes_the_output(model_type):
    model = AdaptedModel(tiny_backbone(model_type))
    model.add_adapter("a", AdapterConfig(placement="houlsby", reduction_factor=4))
    randomize(model)
    model.activate(["a"])
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model.encode(**tiny_batch()), _bare_hidden(model_type), atol=1e-3)


def test_albert_refused_with_clear_error():
    from transformers import AlbertConfig, AlbertModel

    backbone = AlbertModel(
        AlbertConfig(
            vocab_size=50,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            embedding_size=8,
            num_hidden_layers=2,
        )
    )
    with pytest.raises(UserError, match="albert.*shares"):
        AdaptedModel(backbone)


def _model_with_two_tasks():
    model = AdaptedModel(tiny_backbone())
    for name in ("a", "b"):
        model.add_adapter(name, AdapterConfig(reduction_factor=4))
        model.add_head(name, 3)
    return model


def test_only_adapter_and_head_params_require_grad():
    model = _model_with_two_tasks()
    model.set_trainable(adapters=["b"], heads=["b"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n or n.startswith("heads.b.") for n in trainable)
    assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if ".adapters." not in n)
    model.activate(["b"], head="b")
    loss = model(**tiny_batch()).sum()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def test_training_adapter_b_leaves_adapter_a_bit_identical():
    model = _model_with_two_tasks()
    randomize(model.heads["a"])
    before = {k: v.clone() for k, v in model.adapter_state("a").items()} | model.head_state("a")
    model.activate(["a"], head="a")
    model.eval()
    with torch.no_grad():
        predictions_before = model(**tiny_batch())
    model.activate(["b"], head="b")
    model.set_trainable(adapters=["b"], heads=["b"])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(**tiny_batch(seed=step)), torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    after = model.adapter_state("a") | model.head_state("a")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in model.adapter_state("b").items() if "up" in k)
    model.activate(["a"], head="a")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch()), predictions_before)


def test_deepcopy_and_pickle_keep_behaviour():
    model = _model_with_two_tasks()
    randomize(model)
    model.activate(["a"], head="a")
    model.eval()
    with torch.no_grad():
        expected = model(**tiny_batch())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.eval()
        with torch.no_grad():
            assert torch.equal(clone(**tiny_batch()), expected)
        # the slot's block norm (DistilBERT-style reference) and the slots themselves are the clone's own
        assert all(s.base is not o.base for (_, _, s), (_, _, o) in zip(clone.slots(), model.slots(), strict=True))


def test_state_round_trip_is_exact():
    model = _model_with_two_tasks()
    randomize(model)
    state, head = model.adapter_state("a"), model.head_state("a")
    other = _model_with_two_tasks()
    other.load_adapter_state("a", state)
    other.load_head_state("a", head)
    assert all(torch.equal(state[k], v) for k, v in other.adapter_state("a").items())
    assert all(torch.equal(head[k], v) for k, v in other.head_state("a").items())
    with pytest.raises(UserError, match="tensors do not match"):
        other.load_adapter_state("a", {k: v for k, v in list(state.items())[1:]})


def test_backbone_dropout_policy_is_explicit():
    model = _model_with_two_tasks()
    model.train()
    assert not model.backbone.training
    assert all(s.adapters.training for _, _, s in model.slots())
    assert model.heads.training
    with_dropout = AdaptedModel(tiny_backbone(), backbone_dropout=True).train()
    assert with_dropout.backbone.training


def test_bare_backbone_context_restores_selection():
    model = _model_with_two_tasks()
    model.activate(["a"], head="a")
    with model.bare_backbone():
        assert all(s.is_bare for _, _, s in model.slots())
    assert any(s.active == ("a",) for _, _, s in model.slots())


def test_unknown_names_refused():
    model = _model_with_two_tasks()
    with pytest.raises(UserError, match="unknown adapter"):
        model.activate(["zzz"])
    with pytest.raises(UserError, match="already exists"):
        model.add_adapter("a", AdapterConfig())


def test_modules_added_later_follow_the_model_mode():
    model = AdaptedModel(tiny_backbone()).eval()
    model.add_adapter("a", AdapterConfig())
    model.add_adapter("b", AdapterConfig())
    model.add_head("a", 2)
    model.add_fusion("f", ["a", "b"], FusionConfig(dropout=0.5))
    assert not any(m.training for m in model.modules())
    model.train()
    model.add_head("c", 2)
    assert model.heads["c"].training
