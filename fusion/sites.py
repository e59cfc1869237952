"""Where adapters go in each supported architecture: data, not copied forward code.

Each entry of :data:`SITES` lists the stacks of transformer blocks of the base model (one for an encoder or
a decoder, two for an encoder-decoder) and, for the two adapter locations of a block (``attention`` after
the self-attention sub-layer, ``output`` after the feed-forward sub-layer), the module a slot replaces and
how the block's residual and layer norm are reached, plus the linear projections that LoRA can adapt
(``projections``: q, k, v, ffn_in, ffn_out) and the self-attention module prefix tuning extends (``prefix``:
one whose ``forward`` takes ``cache=`` and reads keys and values through ``cache.update``; the BERT family).
Three block shapes cover every entry:

* ``inner`` (post-LN, BERT family): the replaced module takes ``(hidden_states, input_tensor)`` and owns
  ``dense``, ``dropout`` and the norm named by ``norm`` (inside the module); the slot computes
  ``norm(mixed + input_tensor)`` itself.
* ``outer`` (post-LN, DistilBERT): the replaced module returns the sub-layer output and its first input is
  the residual; the block adds it and applies its own norm (``norm``, a path in the block) after the slot.
* ``pre_ln`` (GPT-2, Llama, Mistral, Qwen2, T5, ViT): the replaced module reads ``norm(residual)``; the
  norm named by ``residual_from`` is wrapped by a :class:`~adafuse.fusion.slot.ResidualTap` that hands the
  residual to the slot, and the block adds the residual after the slot.

For a pre-LN block AdapterHub passes no layer norm to its adapters, so the ``pfeiffer`` adapter input is
``h + residual`` and the block computes ``h + a(h + residual) + residual``. ``adapterhub`` gives the
paths AdapterHub ``adapters`` 1.3 uses for the same sites (its saved keys), ``pooling`` the default
pooling of a classification head, ``features`` the sub-module that encodes a text for classification
when the model is an encoder-decoder (T5: its encoder), ``lm_scale`` whether a language-model head reads the
hidden states rescaled by d^-1/2 (T5 with tied embeddings, as transformers and AdapterHub do). Placement
matches AdapterHub 1.3 on every entry, checked against ``shared/fixtures/adapterhub`` and
``shared/fixtures/adapterhub-breadth``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from adafuse.fusion.errors import UserError

LOCATIONS = ("attention", "output")


@dataclass(frozen=True)
class SiteSpec:
    module: str  # path of the replaced module inside a block
    mode: str  # "inner", "outer" or "pre_ln"
    norm: str | None = None  # inner: the module's own norm; outer: the block's norm after the slot
    residual_from: str | None = None  # pre_ln: the block's norm whose input is the residual stream
    adapterhub: str = ""  # AdapterHub's path of this site inside a block (before ".adapters.")


@dataclass(frozen=True)
class Stack:
    layers: str  # path of the ModuleList of blocks inside the base model
    attention: SiteSpec
    output: SiteSpec
    adapterhub_layers: str | None = None  # AdapterHub's path of the blocks, where it differs (transformers 4 names)
    projections: dict[str, str] = field(default_factory=dict)  # LoRA targets (q, k, v, ffn_in, ffn_out) -> nn.Linear
    prefix: str | None = None  # self-attention taking ``cache=``, where prefix tuning prepends keys and values

    @property
    def adapterhub_path(self) -> str:
        return self.adapterhub_layers or self.layers


@dataclass(frozen=True)
class ArchitectureSites:
    stacks: tuple[Stack, ...]
    pooling: str = "cls"  # default pooling of a classification head: cls, last or mean
    features: str | None = None  # encoder-decoder: the sub-module that encodes text for classification
    lm_scale: bool = False  # LM heads read hidden * d^-1/2 when the word embeddings are tied (T5)
    lm: str | None = None  # the language-model head type generation uses (causal_lm, seq2seq_lm); None: no LM
    inputs: str = "text"  # what the backbone reads: text (token ids) or pixels (images)


def _bert_like(
    query: str = "query", key: str = "key", value: str = "value", prefix: str | None = "attention.self"
) -> ArchitectureSites:
    return ArchitectureSites(
        (
            Stack(
                "encoder.layer",
                attention=SiteSpec("attention.output", "inner", norm="LayerNorm", adapterhub="attention.output"),
                output=SiteSpec("output", "inner", norm="LayerNorm", adapterhub="output"),
                projections={
                    "q": f"attention.self.{query}",
                    "k": f"attention.self.{key}",
                    "v": f"attention.self.{value}",
                    "ffn_in": "intermediate.dense",
                    "ffn_out": "output.dense",
                },
                prefix=prefix,
            ),
        )
    )


_BERT_LIKE = _bert_like()


def _pre_ln(layers, attention, attention_norm, ffn, ffn_norm, pooling, projections=None, lm=None) -> ArchitectureSites:
    return ArchitectureSites(
        (
            Stack(
                layers,
                attention=SiteSpec(attention, "pre_ln", residual_from=attention_norm, adapterhub="attention_adapters"),
                output=SiteSpec(ffn, "pre_ln", residual_from=ffn_norm, adapterhub="output_adapters"),
                projections=projections or {},
            ),
        ),
        pooling=pooling,
        lm=lm,
    )


_LLAMA_PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "ffn_in": "mlp.up_proj",
    "ffn_out": "mlp.down_proj",
}
_LLAMA_LIKE = _pre_ln(
    "layers", "self_attn", "input_layernorm", "mlp", "post_attention_layernorm", "last", _LLAMA_PROJECTIONS, "causal_lm"
)


def _t5_stack(layers: str, ffn_index: int) -> Stack:
    ffn = f"layer.{ffn_index}"
    return Stack(
        layers,
        attention=SiteSpec("layer.0.SelfAttention", "pre_ln", residual_from="layer.0.layer_norm", adapterhub="layer.0"),
        output=SiteSpec(f"{ffn}.DenseReluDense", "pre_ln", residual_from=f"{ffn}.layer_norm", adapterhub=ffn),
        projections={
            "q": "layer.0.SelfAttention.q",
            "k": "layer.0.SelfAttention.k",
            "v": "layer.0.SelfAttention.v",
            "ffn_in": f"{ffn}.DenseReluDense.wi",
            "ffn_out": f"{ffn}.DenseReluDense.wo",
        },
    )


SITES: dict[str, ArchitectureSites] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _bert_like("query_proj", "key_proj", "value_proj", prefix=None),  # disentangled attention
    "distilbert": ArchitectureSites(
        (
            Stack(
                "transformer.layer",
                attention=SiteSpec("attention", "outer", norm="sa_layer_norm", adapterhub="attention_adapters"),
                output=SiteSpec("ffn", "outer", norm="output_layer_norm", adapterhub="output_adapters"),
                projections={
                    "q": "attention.q_lin",
                    "k": "attention.k_lin",
                    "v": "attention.v_lin",
                    "ffn_in": "ffn.lin1",
                    "ffn_out": "ffn.lin2",
                },
            ),
        )
    ),
    "gpt2": _pre_ln(
        "h", "attn", "ln_1", "mlp", "ln_2", "last", lm="causal_lm"
    ),  # no LoRA targets: c_attn fuses q, k, v (Conv1D)
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    # the decoder's cross-attention (layer.1) gets no adapter, as in AdapterHub without cross_adapter
    "t5": ArchitectureSites(
        (_t5_stack("encoder.block", 1), _t5_stack("decoder.block", 2)),
        pooling="mean",
        features="encoder",
        lm_scale=True,
        lm="seq2seq_lm",
    ),
    "vit": ArchitectureSites(
        (
            Stack(  # transformers >= 5 layout (ViTLayer.mlp); AdapterHub 1.3 saved the 4.x names
                "layers",
                attention=SiteSpec(
                    "attention", "pre_ln", residual_from="layernorm_before", adapterhub="attention_adapters"
                ),
                output=SiteSpec("mlp", "pre_ln", residual_from="layernorm_after", adapterhub="output.output_adapters"),
                adapterhub_layers="encoder.layer",
                projections={
                    "q": "attention.q_proj",
                    "k": "attention.k_proj",
                    "v": "attention.v_proj",
                    "ffn_in": "mlp.fc1",
                    "ffn_out": "mlp.fc2",
                },
            ),
        ),
        inputs="pixels",
    ),
}

SHARED_LAYER_TYPES = {"albert"}


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
        try:
            module = getattr(module, part)
        except AttributeError:
            raise UserError(
                f"{type(root).__name__} has no module '{path}' where the sites table expects one (this "
                f"transformers version lays the model out differently; adafuse's table follows transformers 5)"
            ) from None
    return module


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the module at dotted ``path`` below ``root`` with ``value`` (module replacement via setattr)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)
