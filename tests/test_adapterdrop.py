"""AdapterDrop in training (Rücklé et al. 2021): ``skip_layers`` = N puts no adapter or fusion module in the
lowest N blocks, so they run as the bare backbone and the backward pass stops above them."""

import json

import pytest
import torch
from conftest import randomize, tiny_backbone, tiny_batch

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.errors import UserError
from adafuse.fusion.formats.adapterhub_read import adapter_config
from adafuse.fusion.formats.adapterhub_write import BackboneInfo, adapter_files
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.sites import get_path

KINDS = {
    "bottleneck": AdapterConfig(reduction_factor=4, skip_layers=1),
    "lora": AdapterConfig(kind="lora", r=2, skip_layers=1),
}


def block_outputs_require_grad(model: AdaptedModel) -> list[bool]:
    """Whether each block's output is part of the autograd graph, from one training forward pass."""
    seen = []
    blocks = get_path(model.backbone, model.sites.stacks[0].layers)
    hooks = [block.register_forward_hook(lambda m, i, o: seen.append(_first(o).requires_grad)) for block in blocks]
    model.train()
    model(**tiny_batch())
    for hook in hooks:
        hook.remove()
    return seen


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_blocks_have_no_module_and_no_graph(kind):
    model = AdaptedModel(tiny_backbone())
    model.add_adapter("a", KINDS[kind])
    model.add_head("a", 3)
    assert {index for index, _, slot in model.slots() if "a" in slot.adapters} == {1}
    model.activate(["a"], head="a")
    model.set_trainable(adapters=["a"], heads=["a"])
    assert block_outputs_require_grad(model) == [False, True]  # backward stops above block 0
    full = AdaptedModel(tiny_backbone())
    full.add_adapter("a", AdapterConfig(**{**KINDS[kind].__dict__, "skip_layers": 0}))
    full.add_head("a", 3)
    full.activate(["a"], head="a")
    full.set_trainable(adapters=["a"], heads=["a"])
    assert block_outputs_require_grad(full) == [True, True]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < sum(
        p.numel() for p in full.parameters() if p.requires_grad
    )


def test_skipped_blocks_compute_the_bare_backbone():
    model = AdaptedModel(tiny_backbone())
    model.add_adapter("a", KINDS["bottleneck"])
    randomize(model, std=0.2)
    seen = {}
    blocks = get_path(model.backbone, model.sites.stacks[0].layers)
    blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault(len(seen), _first(o).detach()))
    model.eval()
    with torch.no_grad():
        with model.bare_backbone():
            model.encode(**tiny_batch())
        model.activate(["a"])
        adapted = model.encode(**tiny_batch())
        model.activate()
        bare = model.encode(**tiny_batch())
    assert torch.equal(seen[0], seen[1])  # block 0 is the bare one in both passes
    assert not torch.allclose(adapted, bare)


def test_fusion_skips_blocks_too_and_where_a_source_has_none():
    model = AdaptedModel(tiny_backbone())
    model.add_adapter("s0", AdapterConfig(reduction_factor=4))
    model.add_adapter("s1", AdapterConfig(reduction_factor=4, skip_layers=1))
    model.add_fusion("f", ["s0", "s1"], FusionConfig())  # s1 has nothing in block 0: no fusion there
    model.add_fusion("g", ["s0"], FusionConfig(skip_layers=1))
    for name in ("f", "g"):
        assert {index for index, _, slot in model.slots() if name in slot.fusions} == {1}
    model.add_head("f", 3)
    model.activate(fusion="f", head="f")
    model.set_trainable(fusions=["f"], heads=["f"])
    assert block_outputs_require_grad(model) == [False, True]


def test_skip_layers_is_checked():
    with pytest.raises(UserError, match="adapter.skip_layers: -1"):
        AdapterConfig(skip_layers=-1)
    model = AdaptedModel(tiny_backbone())
    with pytest.raises(UserError, match="skip_layers 2 leaves none of the 2 blocks"):
        model.add_adapter("a", AdapterConfig(skip_layers=2))
    model.add_adapter("a", AdapterConfig(skip_layers=1))
    with pytest.raises(UserError, match="no block holds all of"):
        model.add_fusion("f", ["a"], FusionConfig(skip_layers=5))


@pytest.mark.parametrize("kind", KINDS)
def test_adapterhub_leave_out_is_skip_layers(kind):
    model = AdaptedModel(tiny_backbone())
    model.add_adapter("a", KINDS[kind])
    info = BackboneInfo("bert", 16, "bert", "BertAdapterModel", "tiny", model.site_paths)
    written = json.loads(adapter_files(info, "a", KINDS[kind], model.adapter_state("a"))["adapter_config.json"])
    assert written["config"]["leave_out"] == [0]
    assert adapter_config(written, "here").skip_layers == 1
    written["config"]["leave_out"] = [1]  # the top block only: not a prefix of the stack
    with pytest.raises(UserError, match=r"leave_out=\[1\] is not supported"):
        adapter_config(written, "here")
