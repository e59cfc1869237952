"""Where adapters go in each supported architecture: data, not copied forward code.

Each entry of :data:`SITES` names, relative to the base model, the list of transformer blocks and, for
the two adapter locations of a block (``attention`` after the attention output projection, ``output``
after the feed-forward output projection), the module that a slot replaces and how its residual and
layer norm are reached:

* ``inner`` modules (BERT family) take ``(hidden_states, input_tensor)`` and own ``dense``,
  ``dropout`` and ``LayerNorm``; the slot computes ``LayerNorm(mixed + input_tensor)`` itself.
* ``outer`` modules (DistilBERT) return the sub-layer output; the residual is their first input and the
  block applies its own layer norm (named by ``layer_norm``) after the slot.

The placement matches AdapterHub ``adapters`` 1.3 (``seq_bn``/``double_seq_bn``), checked against
the fixtures in ``shared/fixtures/adapterhub``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import UserError


@dataclass(frozen=True)
class SiteSpec:
    module: str  # path of the replaced module inside a block
    mode: str  # "inner" or "outer"
    layer_norm: str | None = None  # for "outer": path of the block's layer norm applied after the module


@dataclass(frozen=True)
class ArchitectureSites:
    layers: str  # path of the ModuleList of blocks inside the base model
    attention: SiteSpec
    output: SiteSpec


_BERT_LIKE = ArchitectureSites(
    layers="encoder.layer",
    attention=SiteSpec("attention.output", "inner"),
    output=SiteSpec("output", "inner"),
)

SITES: dict[str, ArchitectureSites] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": ArchitectureSites(
        layers="transformer.layer",
        attention=SiteSpec("attention", "outer", layer_norm="sa_layer_norm"),
        output=SiteSpec("ffn", "outer", layer_norm="output_layer_norm"),
    ),
}

SHARED_LAYER_TYPES = {"albert"}
LOCATIONS = ("attention", "output")


def sites_for(model_type: str) -> ArchitectureSites:
    """Return the adapter sites of ``model_type`` or raise a :class:`UserError` naming the supported ones."""
    if model_type in SHARED_LAYER_TYPES:
        raise UserError(
            f"backbone model_type '{model_type}' shares one set of weights across its layers, so per-layer "
            f"adapters cannot be inserted; supported: {', '.join(sorted(SITES))}"
        )
    if model_type not in SITES:
        raise UserError(
            f"backbone model_type '{model_type}' is not supported; expected one of {', '.join(sorted(SITES))}"
        )
    return SITES[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path (``"encoder.layer"``) from ``root``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the module at dotted ``path`` below ``root`` with ``value`` (module replacement via setattr)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)
