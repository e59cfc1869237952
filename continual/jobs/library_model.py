"""A library opened together with its backbone: what ``predict``, ``library import`` and ``export`` share.

The backbone is the one recorded in the manifest (or the embedded MiniLM, or ``--backbone``: a name, a
folder or a YAML file of :class:`BackboneConfig`); its fingerprint must be the library's. Artefacts are
loaded by name into one :class:`AdaptedModel`, each after its sha256 check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adafuse.continual.config import build, load_config
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.backbone import BackboneConfig, load_model, load_tokenizer
from adafuse.fusion.errors import UserError, VerificationError
from adafuse.fusion.fingerprint import fingerprint
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import AdapterLibrary, changed_sources
from adafuse.fusion.model import AdaptedModel


def backbone_config(option: str | None, library: AdapterLibrary) -> BackboneConfig:
    """``--backbone`` (name, folder or YAML file), else the backbone the manifest records, else the embedded one."""
    if option is None:
        recorded = (library.read_manifest().get("backbone") or {}).get("config")
        return build(BackboneConfig, recorded, "manifest backbone") if recorded else BackboneConfig()
    if option.endswith((".yaml", ".yml")):
        return load_config(BackboneConfig, option)
    return BackboneConfig(name=option)


@dataclass
class LibraryModel:
    library: AdapterLibrary
    model: AdaptedModel
    fingerprint: str
    backbone: BackboneConfig
    label_names: dict[str, list[str]] = field(default_factory=dict)  # head name -> label names
    task_types: dict[str, str] = field(default_factory=dict)  # head name -> its task type
    _tokenizer: object = None

    @property
    def tokenizer(self):
        """Loaded when first needed: import and export work on backbones saved without one (and on ViT)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.backbone)
        return self._tokenizer

    @classmethod
    def open(
        cls, library_dir: str | Path, backbone: str | None = None, create: bool = False, device=None
    ) -> LibraryModel:
        """The library and its backbone, loaded on ``device`` (default: the CPU)."""
        library = AdapterLibrary(library_dir)
        if not create and not library.exists():
            raise UserError(f"'{library_dir}' is not an adapter library (no manifest.json)")
        config = backbone_config(backbone, library)
        model = load_model(config, device)
        fp = fingerprint(model)
        expected = (library.read_manifest().get("backbone") or {}).get("fingerprint")
        if expected is not None and expected != fp:
            raise UserError(
                f"library '{library_dir}' belongs to backbone {expected[:16]}, but backbone "
                f"'{backbone or config.name}' is {fp[:16]}; pass --backbone with the backbone it was trained on"
            )
        return cls(library, AdaptedModel(model), fp, config)

    def load_adapter(self, name: str) -> None:
        if name in self.model.adapter_configs:
            return
        entry = self.library.get("adapter", name)
        self.model.add_adapter(name, AdapterConfig(**entry["config"].get("adapter", {})))
        self.model.load_adapter_state(name, self.library.load("adapter", name, self.fingerprint).tensors)

    def load_head(self, name: str) -> list[str]:
        """Load head ``name``; returns its label names (``label_<i>`` where the library has none)."""
        if name not in self.label_names:
            config = add_library_head(self.model, self.library, self.fingerprint, name)
            num_labels = int(config.get("num_labels") or 0)
            self.label_names[name] = config.get("label_names") or [f"label_{i}" for i in range(num_labels)]
            self.task_types[name] = config.get("task_type", "classification")
        return self.label_names[name]

    def load_fusion(self, name: str) -> list[str]:
        """Load fusion ``name`` and its sources (refused if a source changed since it was trained)."""
        entry = self.library.get("fusion", name)
        sources = [s["name"] for s in entry.get("sources", [])]
        changed = changed_sources(entry, {(e["kind"], e["name"]): e for e in self.library.entries()})
        if changed:
            raise VerificationError(
                f"fusion '{name}': source adapter '{changed[0]}' is missing or changed since the fusion was trained"
            )
        for source in sources:
            self.load_adapter(source)
        if name not in self.model.fusion_sources:
            self.model.add_fusion(name, sources, FusionConfig(**entry["config"].get("fusion", {})))
            self.model.load_fusion_state(name, self.library.load("fusion", name, self.fingerprint).tensors)
            self.model.set_fusion_temperature(1.0)  # a trained fusion predicts at temperature 1
        return sources


def add_library_head(
    model: AdaptedModel, library: AdapterLibrary, fingerprint: str, name: str, as_name: str | None = None
) -> dict:
    """Add the library's head ``name`` to ``model`` (as ``as_name``) with its weights; returns its entry config."""
    entry = library.get("head", name)
    config = entry["config"]
    head = config.get("head", {})
    model.add_head(
        as_name or name,
        int(config.get("num_labels") or 0),
        head.get("pooling", "cls"),
        head.get("dropout", 0.1),
        head_type=head.get("type", "classification"),
        **head.get("options", {}),
    )
    model.load_head_state(as_name or name, library.load("head", name, fingerprint).tensors)
    return config
