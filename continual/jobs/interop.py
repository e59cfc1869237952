"""``adafuse library import`` / ``export``: AdapterHub ``adapters`` and HF PEFT (LoRA) folders in and out of a
library.

Import reads everything, checks it against the backbone (architecture, width, every tensor's shape by
loading it into the model) and only then writes the library. Export writes the AdapterHub layout into a
fresh folder (atomically: a temporary folder renamed at the end).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.backbone import EMBEDDED
from adafuse.fusion.errors import UserError
from adafuse.fusion.formats.adapterhub_read import read_adapter_folder, read_fusion_folder, read_head, read_json
from adafuse.fusion.formats.adapterhub_write import BackboneInfo, adapter_files, fusion_files, head_files
from adafuse.fusion.formats.peft import peft_files, read_peft_folder
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import AdapterLibrary, check_name
from adafuse.fusion.storage import fsync_dir

EMBEDDED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def backbone_info(opened: LibraryModel) -> BackboneInfo:
    backbone = opened.model.backbone
    name = EMBEDDED_HUB_NAME if opened.backbone.name == EMBEDDED else opened.backbone.name
    return BackboneInfo(
        model_type=backbone.config.model_type,
        hidden_size=backbone.config.hidden_size,
        prefix=backbone.base_model_prefix,
        model_class=type(backbone).__name__.removesuffix("Model") + "AdapterModel",
        model_name=name,
        site_paths=opened.model.site_paths,
    )


def _check_backbone(meta: dict, opened: LibraryModel, folder: Path) -> None:
    config = opened.model.backbone.config
    theirs = (meta.get("model_type"), meta.get("hidden_size"))
    if theirs != (config.model_type, config.hidden_size):
        raise UserError(
            f"{folder}: saved for a {theirs[0]} model of hidden size {theirs[1]}, but the library's backbone is "
            f"{config.model_type} with hidden size {config.hidden_size}"
        )


def _label_names(head: dict) -> list[str]:
    label2id = head.get("label2id") or {}
    if sorted(label2id.values()) != list(range(head["num_labels"])):
        return [f"label_{i}" for i in range(head["num_labels"])]
    return [label for label, _ in sorted(label2id.items(), key=lambda item: item[1])]


# what an AdapterHub folder holds, by the config file it has (checked in this order)
_CONFIG_FILES = {"fusion": "adapter_fusion_config.json", "adapter": "adapter_config.json", "head": "head_config.json"}


def _folder_kind(folder: Path) -> str:
    """fusion, adapter or head (a ``save_head`` folder): the first of :data:`_CONFIG_FILES` that ``folder`` has."""
    for kind, filename in _CONFIG_FILES.items():
        if (folder / filename).is_file():
            return kind
    raise UserError(f"'{folder}': none of adapter_config.json, adapter_fusion_config.json, head_config.json found")


def _read_folder(folder: Path, kind: str, site_paths) -> dict:
    """What an AdapterHub folder of ``kind`` holds, its keys mapped through the model's ``site_paths``."""
    if kind == "fusion":
        return read_fusion_folder(folder, site_paths)
    if kind == "adapter":
        return read_adapter_folder(folder, site_paths)
    meta = read_json(folder / _CONFIG_FILES["head"])
    name = meta.get("name") or folder.name
    return {"name": name, "meta": meta, "head": read_head(folder, name)}


def import_adapterhub(folder: Path, library_dir: Path, backbone: str | None, name: str | None, log=print) -> list:
    """Import one AdapterHub adapter or fusion folder (with its head, if saved), or a saved head, into the library."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"'{folder}': not a folder (expected an AdapterHub save_adapter/save_adapter_fusion folder)")
    kind = _folder_kind(folder)
    opened = LibraryModel.open(library_dir, backbone, create=True)
    # the architecture first: the folder's keys only map onto the sites of its own architecture
    _check_backbone(read_json(folder / _CONFIG_FILES[kind]), opened, folder)
    read = _read_folder(folder, kind, opened.model.site_paths)
    model, library, target = opened.model, opened.library, check_name(name or read["name"])
    if library.find(kind, target) is not None:  # never overwrite finished work (fusions may depend on it)
        raise UserError(f"library '{library_dir}' already has an {kind} named '{target}'; import it with --name NEW")
    config = {"method": "import", "imported_from": "adapterhub", "adapterhub_version": read["meta"].get("version")}
    artefacts = []
    if kind == "fusion":
        for source in read["sources"]:
            if library.find("adapter", source) is None:
                raise UserError(f"{folder}: source adapter '{source}' is not in the library; import it first")
            opened.load_adapter(source)
        model.add_fusion(target, read["sources"], read["config"])
        model.load_fusion_state(target, read["tensors"])
        config["fusion"] = asdict(read["config"])
        extra = {"sources": [{"name": s, "sha256": library.get("adapter", s)["sha256"]} for s in read["sources"]]}
        artefacts.append(("fusion", model.fusion_state(target), extra))
    elif kind == "adapter":
        model.add_adapter(target, read["config"])
        model.load_adapter_state(target, read["tensors"])
        config["adapter"] = asdict(read["config"])
        artefacts.append(("adapter", model.adapter_state(target), {}))
    head = read["head"]
    if head is not None:
        model.add_head(target, head["num_labels"] or 0, head_type=head["type"], **head["options"])
        model.load_head_state(target, head["tensors"])
        config["head"] = {"type": head["type"], "pooling": "auto", "dropout": 0.1, "options": head["options"]}
        if head["num_labels"]:
            config |= {"num_labels": head["num_labels"], "label_names": _label_names(head)}
        artefacts.append(("head", model.head_state(target), {}))
    backbone_record = {"fingerprint": opened.fingerprint, "backbone": asdict(opened.backbone)}
    written = [library.add(k, target, tensors, config=config, **backbone_record, **x) for k, tensors, x in artefacts]
    for entry in written:
        log(f"imported {entry['kind']} '{entry['name']}' -> {opened.library.root / entry['file']}")
    return written


def import_peft(folder: Path, library_dir: Path, backbone: str | None, name: str | None, log=print) -> list:
    """Import a PEFT LoRA folder (``save_pretrained``) into the library as a ``lora`` adapter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"'{folder}': not a folder (expected a PEFT save_pretrained folder)")
    opened = LibraryModel.open(library_dir, backbone, create=True)
    read = read_peft_folder(folder, opened.model.site_paths)
    target = check_name(name or folder.name)
    if opened.library.find("adapter", target) is not None:
        raise UserError(f"library '{library_dir}' already has an adapter named '{target}'; import it with --name NEW")
    opened.model.add_adapter(target, read["config"])
    opened.model.load_adapter_state(target, read["tensors"])  # every shape checked before anything is written
    config = {"method": "import", "imported_from": "peft", "adapter": asdict(read["config"])}
    backbone_record = {"fingerprint": opened.fingerprint, "backbone": asdict(opened.backbone)}
    entry = opened.library.add("adapter", target, opened.model.adapter_state(target), config=config, **backbone_record)
    log(f"imported adapter '{target}' (lora, from PEFT) -> {opened.library.root / entry['file']}")
    return [entry]


def export_peft(library_dir: Path, name: str, out: Path, backbone: str | None) -> Path:
    """Write LoRA adapter ``name`` as a PEFT folder (``PeftModel.from_pretrained(base, out)`` loads it)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' exists and is not an empty folder")
    opened = LibraryModel.open(library_dir, backbone)
    if opened.library.find("adapter", name) is None:
        raise UserError(f"library '{library_dir}' has no adapter named '{name}'")
    opened.load_adapter(name)
    config = opened.model.adapter_configs[name]
    base = EMBEDDED_HUB_NAME if opened.backbone.name == EMBEDDED else opened.backbone.name
    _write_folder(out, peft_files(config, opened.model.adapter_state(name), opened.model.site_paths, base))
    return out


def export_adapterhub(
    library_dir: Path, name: str, out: Path, backbone: str | None, kind: str | None = None, warn=None
) -> Path:
    """Write adapter or fusion ``name`` (and its head, if the library has one), or a head alone, as an AdapterHub
    folder."""
    out = Path(out)
    warn = warn or (lambda line: print(f"adafuse: warning: {line}", file=sys.stderr))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' exists and is not an empty folder")
    library = AdapterLibrary(library_dir)
    if not library.exists():
        raise UserError(f"'{library_dir}' is not an adapter library (no manifest.json)")
    kinds = [k for k in ([kind] if kind else ["adapter", "fusion"]) if library.find(k, name)]
    if not kinds and kind is None and library.find("head", name):
        kinds = ["head"]  # a head saved on its own (AdapterHub save_head)
    if not kinds:
        raise UserError(f"library '{library_dir}' has no {kind or 'adapter, fusion or head'} named '{name}'")
    if len(kinds) > 1:
        raise UserError(f"library '{library_dir}' has both an adapter and a fusion named '{name}'; pass --kind")
    opened = LibraryModel.open(library_dir, backbone)
    info = backbone_info(opened)
    entry = library.get(kinds[0], name)
    if kinds[0] == "adapter":
        opened.load_adapter(name)
        ah_name = name
        config = AdapterConfig(**entry["config"]["adapter"])
        files = adapter_files(info, name, config, opened.model.adapter_state(name))
    elif kinds[0] == "fusion":
        sources = opened.load_fusion(name)
        ah_name = ",".join(sources)
        state = opened.model.fusion_state(name)
        files = fusion_files(info, sources, FusionConfig(**entry["config"]["fusion"]), state)
    else:
        ah_name, files = name, {}
    if library.find("head", name) is not None:
        labels = opened.load_head(name)
        head, model = opened.model.heads[name], opened.model
        pooling = getattr(head, "pooling", None)  # None: a language-model head
        if pooling is not None and (pooling != model.resolve_pooling("auto") or model.sites.features is not None):
            # AdapterHub reads the first token (encoders), the last one (decoders), T5's decoder eos tokens
            if kinds[0] == "head":
                raise UserError(
                    f"head '{name}' pools by '{pooling}', which AdapterHub's {info.model_type} heads do not"
                )
            warn(
                f"head '{name}' not exported: it pools by '{pooling}', which AdapterHub's {info.model_type} "
                "heads do not"
            )
        else:
            dropout = float(entry["config"].get("head", {}).get("dropout", 0.1))
            files |= head_files(info, ah_name, head, opened.model.head_state(name), labels, dropout)
    _write_folder(out, files)
    return out


def _write_folder(out: Path, files: dict[str, bytes]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for filename, data in files.items():
            (staging / filename).write_bytes(data)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
        fsync_dir(out.parent)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write '{out}': {err.strerror}") from None
