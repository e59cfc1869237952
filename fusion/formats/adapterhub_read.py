"""Reading AdapterHub ``adapters`` (1.x) saved folders: configs and key names mapped onto adafuse modules.

Only safetensors are read directly; a ``.bin`` goes through ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers (no foreign code runs).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.errors import UserError, first_line
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import read_foreign_safetensors
from adafuse.fusion.storage import read_json_object

# <model prefix>.<site path>.<adapters|adapter_fusion_layer|loras>.<name>.<param>; site paths: the sites table's
_SLOT_KEY = re.compile(r"^(.*?)\.(?:adapters|adapter_fusion_layer|loras)\.(.+)$")
# <model prefix>.<site path>.prefix_tuning.pool.prefix_tunings.<name>.self_prefix.<param>, and once more for the
# model's pool (<model prefix>.prefix_tuning.prefix_tunings...): the same shared tensors, read from the layers
_PREFIX_KEY = re.compile(r"^(.*?)\.?prefix_tuning\.(?:pool\.)?prefix_tunings\.(.+)$")
_SHARED_KEY = re.compile(r"^(?:[a-z_]+\.)?shared_parameters\.(.+)\.(phm_rule)$")  # Compacter's shared rule
SitePaths = dict[tuple[int, str], str]  # (block index, location) -> AdapterHub's site path (AdaptedModel.site_paths)
_PARAM_RENAMES = (("adapter_down.0.", "down."), ("adapter_up.", "up."))
# AdapterHub options adafuse computes, per kind; anything else must be at these values to be imported.
_BOTTLENECK_REQUIRED = {
    "residual_before_ln": True,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "use_gating": False,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "stochastic_depth": 0.0,
}
_REQUIRED = {
    "bottleneck": {**_BOTTLENECK_REQUIRED, "phm_layer": False, "is_parallel": False, "scaling": 1.0},
    "parallel": {**_BOTTLENECK_REQUIRED, "phm_layer": False},
    "compacter": {
        **_BOTTLENECK_REQUIRED,
        "is_parallel": False,
        "scaling": 1.0,
        "shared_phm_rule": True,
        "factorized_phm_W": True,
        "factorized_phm_rule": False,
        "shared_W_phm": False,
        "phm_rank": 1,
        "phm_bias": True,
    },
    "prefix": {"flat": False, "use_gating": False, "encoder_prefix": True},
    "lora": {
        "selfattn_lora": True,
        "composition_mode": "add",
        "use_gating": False,
        "use_dora": False,
        "vera_b": None,
        "vera_d": None,
    },
}
_LORA_TARGETS = {"intermediate_lora": "ffn_in", "output_lora": "ffn_out"}


def read_json(path: Path) -> dict:
    """A JSON object whose ``config`` (if present) is an object too."""
    data = read_json_object(path, "an AdapterHub config file")
    if not isinstance(data.get("config", {}), dict):
        raise UserError(f"{path}: expected a JSON object with a 'config' object (an AdapterHub config file)")
    return data


def _parsed(where: str, build):
    """``build()``, with a malformed value anywhere in an AdapterHub config reported as one clean error."""
    try:
        return build()
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise UserError(f"{where}: unexpected value in the AdapterHub config ({type(err).__name__}: {err})") from None


def load_tensors(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """Tensors of ``<stem>.safetensors`` or, failing that, ``pytorch_<stem>.bin`` (weights_only)."""
    safe = folder / f"{stem}.safetensors"
    if safe.is_file():
        return read_foreign_safetensors(safe)
    binary = folder / f"pytorch_{stem}.bin"
    if binary.is_file():
        try:
            with warnings.catch_warnings():  # torch's remarks on pickle protocols are not the user's concern
                warnings.simplefilter("ignore")
                return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling refusal is reported the same way
            raise UserError(f"{binary}: refused to load (only plain tensors are accepted): {first_line(err)}") from None
    raise UserError(f"{folder}: neither {safe.name} nor {binary.name} found")


def adapter_config(adapter_json: dict, where: str) -> AdapterConfig:
    """An AdapterHub adapter config (bottleneck, parallel, Compacter or LoRA) as an :class:`AdapterConfig`."""
    config = adapter_json.get("config", adapter_json)
    architecture = config.get("architecture")
    if architecture in ("lora", "prefix_tuning"):
        kind = architecture.removesuffix("_tuning")
    elif architecture in (None, "bottleneck"):
        kind = "parallel" if config.get("is_parallel") else "compacter" if config.get("phm_layer") else "bottleneck"
    else:
        raise UserError(
            f"{where}: AdapterHub architecture {architecture!r} is not supported (bottleneck, lora, prefix_tuning)"
        )
    for key, value in _REQUIRED[kind].items():
        if key in config and config[key] != value:
            raise UserError(f"{where}: AdapterHub option {key}={config[key]!r} is not supported (expected {value!r})")
    leave_out = sorted(config.get("leave_out") or [])
    if leave_out != list(range(len(leave_out))):
        raise UserError(f"{where}: AdapterHub leave_out={leave_out} is not supported (expected layers 0..N-1)")
    return _READERS[kind](kind, config, where, {"skip_layers": len(leave_out)})


def _lora_config(kind: str, config: dict, where: str, skip: dict) -> AdapterConfig:
    targets = list(config.get("attn_matrices", ["q", "v"]))
    targets += [target for key, target in _LORA_TARGETS.items() if config.get(key)]
    return AdapterConfig(
        kind="lora", r=int(config.get("r", 8)), alpha=float(config.get("alpha", 8)), target_modules=targets,
        dropout=float(config.get("dropout", 0.0)), **skip,
    )  # fmt: skip


def _prefix_config(kind: str, config: dict, where: str, skip: dict) -> AdapterConfig:
    return AdapterConfig(
        kind="prefix", prefix_length=int(config.get("prefix_length", 30)),
        bottleneck=int(config.get("bottleneck_size", 512)),
        non_linearity=config.get("non_linearity", "tanh").lower(),
        dropout=float(config.get("dropout", 0.0)), **skip,
    )  # fmt: skip


def _bottleneck_config(kind: str, config: dict, where: str, skip: dict) -> AdapterConfig:
    """Bottleneck, parallel and Compacter: one AdapterHub architecture with presets."""
    locations = (config.get("mh_adapter", False), config.get("output_adapter", True))
    placement = {(False, True): "pfeiffer", (True, True): "houlsby"}.get(locations)
    if placement is None:
        raise UserError(f"{where}: mh_adapter/output_adapter = {locations} is not a supported placement")
    return AdapterConfig(
        kind=kind,
        placement=placement,
        reduction_factor=int(config.get("reduction_factor", 16)),
        non_linearity=config.get("non_linearity", "relu").lower(),
        ln_before=bool(config.get("original_ln_before", placement == "pfeiffer")),
        scaling=float(config.get("scaling", 1.0)) if kind == "parallel" else None,
        phm_dim=int(config.get("phm_dim", 4)),
        **skip,
    )


# adafuse kind -> the reader of its AdapterHub options (the writer's table: adapterhub_write._WRITERS)
_READERS = {
    "bottleneck": _bottleneck_config,
    "parallel": _bottleneck_config,
    "compacter": _bottleneck_config,
    "lora": _lora_config,
    "prefix": _prefix_config,
}


def fusion_config(fusion_json: dict) -> FusionConfig:
    config = fusion_json.get("config", fusion_json)
    return FusionConfig(
        query=config.get("query", True),
        key=config.get("key", True),
        value=config.get("value", True),
        query_before_ln=config.get("query_before_ln", False),
        residual_before=config.get("residual_before", False),
        value_initialized=bool(config.get("value_initialized", True)),
        regularization=config.get("regularization", True),
        temperature=config.get("temperature", False),
        dropout=config.get("dropout_prob") or 0.0,
    )


def map_slot_keys(
    tensors: dict[str, torch.Tensor], name: str, where: str, site_paths: SitePaths
) -> dict[str, torch.Tensor]:
    """``bert.encoder.layer.3.output.adapters.<name>.adapter_up.weight`` -> ``3.output.up.weight``
    (``transformer.h.3.output_adapters...`` on GPT-2, ``...attention.self.query.loras.<name>.lora_A`` ->
    ``3.q.lora_A``, and so on: ``site_paths`` is the model's table). Compacter's shared rule
    (``shared_parameters.<name>.phm_rule``) goes to every PHM layer of the adapter."""
    slots = {path: f"{index}.{location}" for (index, location), path in site_paths.items()}
    mapped, shared = {}, {}
    for key, value in tensors.items():
        prefix_match = _PREFIX_KEY.match(key)
        if prefix_match:
            path, param = prefix_match.group(1), prefix_match.group(2)
            site = slots.get(path) or slots.get(path.partition(".")[2])
            if site is None and "." not in path:  # the model's pool: a copy of the layers'
                continue
            if site is None or not param.startswith(f"{name}.self_prefix."):
                raise UserError(f"{where}: unexpected tensor '{key}' for '{name}'")
            mapped[f"{site}.{param.removeprefix(f'{name}.self_prefix.')}"] = value
            continue
        match = _SLOT_KEY.match(key)
        site = match and (slots.get(match.group(1)) or slots.get(match.group(1).partition(".")[2]))
        shared_match = _SHARED_KEY.match(key)
        if shared_match and shared_match.group(1) == name:
            shared[shared_match.group(2)] = value
            continue
        if site is None or not match.group(2).startswith(f"{name}."):
            raise UserError(f"{where}: unexpected tensor '{key}' for '{name}'")
        param = match.group(2)[len(name) + 1 :]
        for old, new in _PARAM_RENAMES:
            param = param.replace(old, new)
        if param.endswith(".b"):  # a PHM layer's bias
            param += "ias"
        mapped[f"{site}.{param}"] = value
    for key in [k for k in mapped if k.endswith(".W_left")]:
        for param, value in shared.items():
            mapped[key.removesuffix("W_left") + param] = value
    return mapped


def head_tensors(tensors: dict[str, torch.Tensor], head_name: str) -> dict[str, torch.Tensor]:
    """Keys of exactly the head ``head_name`` (AdapterHub files may hold other heads with that prefix)."""
    prefix = f"heads.{head_name}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_adapter_folder(folder: Path, site_paths: SitePaths) -> dict:
    """An AdapterHub adapter folder -> name, AdapterConfig, mapped tensors, optional head (config, tensors).

    ``site_paths`` (:attr:`AdaptedModel.site_paths` of the target model) maps AdapterHub's keys onto its slots.
    """
    folder = Path(folder)
    meta = read_json(folder / "adapter_config.json")
    name = meta.get("name") or folder.name
    where = str(folder / "adapter_config.json")
    result = {
        "name": _name(name, where),
        "config": _parsed(where, lambda: adapter_config(meta, where)),
        "tensors": map_slot_keys(load_tensors(folder, "adapter"), name, str(folder), site_paths),
        "meta": meta,
        "head": read_head(folder, name),
    }
    return result


def read_fusion_folder(folder: Path, site_paths: SitePaths) -> dict:
    folder = Path(folder)
    meta = read_json(folder / "adapter_fusion_config.json")
    where = str(folder / "adapter_fusion_config.json")
    name = _name(meta.get("name") or folder.name, where)
    sources = meta.get("adapter_names", name.split(","))
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise UserError(f"{where}: 'adapter_names' must be a non-empty list of adapter names")
    return {
        "name": name,
        "sources": sources,
        "config": _parsed(where, lambda: fusion_config(meta)),
        "tensors": map_slot_keys(load_tensors(folder, "model_adapter_fusion"), name, str(folder), site_paths),
        "meta": meta,
        "head": read_head(folder, name),
    }


def _name(name, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: 'name' must be a non-empty string, found {name!r}")
    return name


def read_head(folder: Path, head_name: str) -> dict | None:
    """The head saved beside an adapter or fusion: its type, the options of :func:`build_head`, tensors."""
    if not (folder / "head_config.json").is_file():
        return None
    where = folder / "head_config.json"
    config = read_json(where).get("config", {})
    head_type = config.get("head_type")
    reader = _HEAD_READERS.get(head_type)
    if reader is None:
        raise UserError(
            f"{where}: head_type {head_type!r} is not supported (expected one of {', '.join(_HEAD_READERS)})"
        )
    head = _parsed(str(where), lambda: reader(config, str(where)))
    tensors = head_tensors(load_tensors(folder, "model_head"), head_name)
    return {**head, "type": head_type, "tensors": tensors}


def _classification_head(config: dict, where: str) -> dict:
    default_layers = 1 if config.get("head_type") == "image_classification" else 2
    layers = config.get("layers", default_layers)
    if config.get("use_pooler") or config.get("multilabel") or not isinstance(layers, int) or layers < 1:
        raise UserError(f"{where}: only single-label classification heads without pooler are supported")
    if layers > 1 and (config.get("activation_function") or "tanh") != "tanh":
        raise UserError(f"{where}: activation_function {config['activation_function']!r} (expected 'tanh')")
    num_labels = config.get("num_labels")
    label2id = config.get("label2id")
    if not isinstance(num_labels, int) or num_labels < 2 or not isinstance(label2id, dict | None):
        raise UserError(f"{where}: expected an integer num_labels >= 2 and a label2id object")
    if config.get("bias", True) is not True:
        raise UserError(f"{where}: classification heads without bias are not supported")
    return {"num_labels": num_labels, "label2id": label2id, "options": {"layers": layers}}


def _lm_head(config: dict, where: str) -> dict:
    vocab_size, layers = config.get("vocab_size"), config.get("layers", 1)
    if not isinstance(vocab_size, int) or vocab_size < 1 or not isinstance(layers, int) or layers < 1:
        raise UserError(f"{where}: expected integers vocab_size >= 1 and layers >= 1")
    options = {
        "vocab_size": vocab_size,
        "layers": layers,
        "activation": config.get("activation_function"),
        "layer_norm": bool(config.get("layer_norm", False)),
        "bias": bool(config.get("bias", False)),
    }
    return {"num_labels": None, "label2id": None, "options": options}


_HEAD_READERS = {
    "classification": _classification_head,
    "image_classification": _classification_head,
    "causal_lm": _lm_head,
    "seq2seq_lm": _lm_head,
}
