"""Writing AdapterHub ``adapters`` 1.3 folders: the layout ``model.load_adapter(DIR)`` /
``model.load_adapter_fusion(DIR)`` read (configs as JSON, weights as safetensors).

The inverse of :mod:`adafuse.fusion.formats.adapterhub_read`: keys go back to
``<prefix>.encoder.layer.<i>.<site>.adapters.<name>.adapter_down.0.weight`` and so on, configs carry
every option AdapterHub expects with the values adafuse computes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig

VERSION = "adapters.1.3.0"
_PARAM_NAMES = {"down.": "adapter_down.0.", "up.": "adapter_up."}
# Options of an AdapterHub bottleneck config that adafuse's adapter always has at these values.
_FIXED_OPTIONS = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "is_parallel": False,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "original_ln_after": True,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}


@dataclass
class BackboneInfo:
    """What an AdapterHub config records about the model: its type, width, class and name."""

    model_type: str
    hidden_size: int
    prefix: str  # base_model_prefix, e.g. "bert"
    model_class: str  # e.g. "BertAdapterModel"
    model_name: str
    site_paths: dict[tuple[int, str], str]  # (block, location) -> AdapterHub's site path (AdaptedModel.site_paths)


def _header(info: BackboneInfo, name: str, config: dict) -> dict:
    return {
        "config": config,
        "hidden_size": info.hidden_size,
        "model_class": info.model_class,
        "model_name": info.model_name,
        "model_type": info.model_type,
        "name": name,
        "version": VERSION,
    }


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _slot_keys(tensors: dict[str, torch.Tensor], info: BackboneInfo, name: str, container: str = "adapters") -> dict:
    """``3.output.down.weight`` -> ``bert.encoder.layer.3.output.<container>.<name>.adapter_down.0.weight``;
    Compacter's rule, a copy in every PHM layer here, is written once as ``<prefix>.shared_parameters.<name>``."""
    out = {}
    for key, value in tensors.items():
        layer, location, param = key.split(".", 2)
        if param.endswith("phm_rule"):
            out[f"{info.prefix}.shared_parameters.{name}.phm_rule"] = value.detach().contiguous().cpu()
            continue
        if param.endswith(".bias") and key.replace(".bias", ".W_left") in tensors:
            param = param.removesuffix("ias")  # a PHM layer's bias is "b"
        for new, old in _PARAM_NAMES.items():
            if param.startswith(new):
                param = old + param[len(new) :]
        path = f"{info.prefix}.{info.site_paths[(int(layer), location)]}.{container}.{name}.{param}"
        out[path] = value.detach().contiguous().cpu()
    return out


def _prefix_keys(tensors: dict[str, torch.Tensor], info: BackboneInfo, name: str) -> dict:
    """``0.prefix.wte.weight`` -> ``bert.encoder.layer.0.attention.self.prefix_tuning.pool.prefix_tunings.<name>
    .self_prefix.wte.weight`` for each layer, plus the model pool's copy (``bert.prefix_tuning.prefix_tunings...``):
    AdapterHub saves the shared reparametrisation under every path that reaches it."""
    out = {}
    for key, value in tensors.items():
        layer, location, param = key.split(".", 2)
        value = value.detach().contiguous().cpu()
        tail = f"prefix_tunings.{name}.self_prefix.{param}"
        out[f"{info.prefix}.{info.site_paths[(int(layer), location)]}.prefix_tuning.pool.{tail}"] = value
        out.setdefault(f"{info.prefix}.prefix_tuning.{tail}", value.clone())  # safetensors: no shared storage
    return out


def adapter_config_json(config: AdapterConfig, info: BackboneInfo, name: str) -> dict:
    return _header(info, name, _WRITERS[config.acts][0](config, info, name))


def _bottleneck_options(config: AdapterConfig, info: BackboneInfo, name: str) -> dict:
    size = config.size(info.hidden_size)
    factor = info.hidden_size / size
    if int(info.hidden_size // factor) != size:
        raise UserError(f"adapter '{name}': bottleneck {size} cannot be written as an AdapterHub reduction factor")
    options = {
        **_FIXED_OPTIONS,
        "mh_adapter": config.placement == "houlsby",
        "output_adapter": True,
        "non_linearity": config.non_linearity,
        "original_ln_before": config.input == "normed",
        "reduction_factor": int(factor) if factor == int(factor) else factor,
        "is_parallel": config.input == "residual",
        "scaling": config.delta_scale,
        "phm_layer": config.phm,
        "phm_dim": config.phm_dim,
        "leave_out": list(range(config.skip_layers)),
    }
    if config.input == "residual":
        options["init_weights"] = "mam_adapter"
    return dict(sorted(options.items()))


def _lora_options(config: AdapterConfig, info: BackboneInfo, name: str) -> dict:
    attention = [m for m in config.target_modules if m in ("q", "k", "v")]
    if not attention:
        raise UserError(f"adapter '{name}': AdapterHub LoRA needs at least one of q, k, v in target_modules")
    return {
        "alpha": config.alpha,
        "architecture": "lora",
        "attn_matrices": attention,
        "composition_mode": "add",
        "dropout": config.dropout,
        "dtype": None,
        "init_weights": "lora",
        "init_weights_seed": None,
        "intermediate_lora": "ffn_in" in config.target_modules,
        "leave_out": list(range(config.skip_layers)),
        "output_lora": "ffn_out" in config.target_modules,
        "r": config.r,
        "selfattn_lora": True,
        "use_dora": False,
        "use_gating": False,
        "vera_b": None,
        "vera_d": None,
    }


def _prefix_options(config: AdapterConfig, info: BackboneInfo, name: str) -> dict:
    return {
        "architecture": "prefix_tuning",
        "bottleneck_size": config.size(info.hidden_size),
        "cross_prefix": True,
        "dropout": config.dropout,
        "encoder_prefix": True,
        "flat": False,
        "init_weights_seed": None,
        "leave_out": list(range(config.skip_layers)),
        "non_linearity": config.non_linearity,
        "prefix_length": config.prefix_length,
        "shared_gating": True,
        "use_gating": False,
    }


def fusion_config_json(config: FusionConfig, info: BackboneInfo, sources: list[str]) -> dict:
    if config.composition != "attention":
        raise UserError(f"fusion '{','.join(sources)}': a {config.composition} composition has no AdapterHub layout")
    options = {
        "dropout_prob": config.dropout or None,
        "key": config.key,
        "query": config.query,
        "query_before_ln": config.query_before_ln,
        "regularization": config.regularization,
        "residual_before": config.residual_before,
        "temperature": False,  # a trained fusion predicts at temperature 1
        "value": config.value,
        "value_before_softmax": True,
        "value_initialized": config.value_initialized,
    }
    name = ",".join(sources)
    return {"adapter_names": list(sources), **_header(info, name, options)}


def head_files(
    info: BackboneInfo, name: str, head: nn.Module, tensors: dict, label_names: list[str], dropout: float
) -> dict:
    """AdapterHub's head config and weights for a classification or language-model head."""
    head_type = getattr(head, "head_type", "classification")
    linears = [m for m in head if isinstance(m, nn.Linear)]
    if head_type.endswith("classification"):
        config = {
            "activation_function": "tanh",
            "bias": True,
            "dropout_prob": dropout,
            "head_type": head_type,
            "label2id": {label: index for index, label in enumerate(label_names)},
            "layers": len(linears),
            "num_labels": len(label_names),
            "use_pooler": False,
        }
        if head_type == "image_classification":
            config["multilabel"] = False
    else:
        activations = [m.name for m in head if hasattr(m, "name")]
        config = {
            "activation_function": activations[0] if activations else None,
            "bias": linears[-1].bias is not None,
            "dropout_prob": None,
            "embedding_size": info.hidden_size,
            "head_type": head_type,
            "label2id": None,
            "layer_norm": any(isinstance(m, nn.LayerNorm) for m in head),
            "layers": len(linears),
            "shift_labels": head_type == "causal_lm",
            "vocab_size": linears[-1].out_features,
        }
    weights = {f"heads.{name}.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()}
    return {"head_config.json": _json(_header(info, name, config)), "model_head.safetensors": save(weights)}


def adapter_files(info: BackboneInfo, name: str, config: AdapterConfig, tensors: dict) -> dict[str, bytes]:
    """The files of an AdapterHub adapter folder (without its head)."""
    return {
        "adapter_config.json": _json(adapter_config_json(config, info, name)),
        "adapter.safetensors": save(_WRITERS[config.acts][1](tensors, info, name)),
    }


# where a kind acts -> (its AdapterHub config options, its AdapterHub tensor names)
_WRITERS = {
    "slot": (_bottleneck_options, _slot_keys),
    "projection": (_lora_options, functools.partial(_slot_keys, container="loras")),
    "prefix": (_prefix_options, _prefix_keys),
}


def fusion_files(info: BackboneInfo, sources: list[str], config: FusionConfig, tensors: dict) -> dict[str, bytes]:
    """The files of an AdapterHub fusion folder (without its head); AdapterHub names a fusion by its sources."""
    name = ",".join(sources)
    return {
        "adapter_fusion_config.json": _json(fusion_config_json(config, info, sources)),
        "model_adapter_fusion.safetensors": save(_slot_keys(tensors, info, name, "adapter_fusion_layer")),
    }
