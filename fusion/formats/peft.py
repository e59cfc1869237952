"""HF PEFT's LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``) in and out of adafuse.

PEFT keys name the adapted module by its path in the model it wrapped
(``base_model.model.[<prefix>.]encoder.layer.3.attention.self.query.lora_A.weight``); adafuse's LoRA keys name
the projection slot (``3.q.lora_A``). The sites table's projection paths connect the two, so the target
modules map by name on every architecture with LoRA targets. The delta is PEFT's: (lora_alpha / r) B A x.
Options that change that formula or adapt anything besides whole projections are refused, naming them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save

from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import read_foreign_safetensors
from adafuse.fusion.storage import read_json_object

_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
# PEFT options adafuse computes only at these values (absent keys are PEFT's defaults, which are these).
_REQUIRED = {
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "lora_bias": False,
}
SitePaths = dict[tuple[int, str], str]


def read_peft_folder(folder: Path, site_paths: SitePaths) -> dict:
    """A PEFT LoRA folder -> AdapterConfig and tensors keyed like :meth:`AdaptedModel.adapter_state`."""
    where = folder / "adapter_config.json"
    config = read_json_object(where, "a PEFT save_pretrained folder's config")
    refused = [f"{k}={config[k]!r}" for k, v in _REQUIRED.items() if k in config and config[k] not in (v, None, [], {})]
    if config.get("peft_type") != "LORA":  # absent counts too: then it is not a PEFT LoRA config
        refused.insert(0, f"peft_type={config.get('peft_type')!r}")
    if refused:
        raise UserError(f"{where}: unsupported PEFT options {', '.join(refused)} (adafuse imports plain LoRA)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder}: adapter_model.safetensors not found (adafuse reads PEFT's safetensors only)")
    slots = {path: f"{index}.{location}" for (index, location), path in site_paths.items()}
    tensors, targets = {}, set()
    for key, value in read_foreign_safetensors(weights).items():
        match = _KEY.match(key)
        path = match and match.group(1)
        site = match and (slots.get(path) or slots.get(path.partition(".")[2]))
        if site is None:
            raise UserError(f"{weights}: tensor '{key}' is not a LoRA factor of a projection adafuse can adapt")
        tensors[f"{site}.{match.group(2)}"] = value
        targets.add(site.split(".")[1])
    try:
        adapter = AdapterConfig(
            kind="lora",
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=sorted(targets),
            dropout=float(config.get("lora_dropout") or 0.0),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{where}: expected integer 'r' and number 'lora_alpha' ({type(err).__name__}: {err})"
        ) from None
    return {"config": adapter, "tensors": tensors, "meta": config}


def peft_files(config: AdapterConfig, tensors: dict[str, torch.Tensor], site_paths: SitePaths, base_model: str) -> dict:
    """The files of a PEFT LoRA folder for an adafuse LoRA adapter (``PeftModel.from_pretrained`` reads them)."""
    if config.kind != "lora":
        raise UserError(f"only LoRA adapters export to PEFT; this one is '{config.kind}'")
    weights, modules = {}, set()
    for key, value in tensors.items():
        layer, location, factor = key.split(".")
        path = site_paths[(int(layer), location)]
        weights[f"base_model.model.{path}.{factor}.weight"] = value.detach().contiguous().cpu()
        modules.add(path)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        # a regex PEFT full-matches against module names: exactly these projections (a suffix list such as
        # "output.dense" would also catch BERT's attention.output.dense)
        "target_modules": "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return {
        "adapter_config.json": (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode(),
        "adapter_model.safetensors": save(weights),
    }
