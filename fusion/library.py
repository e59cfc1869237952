"""The adapter library: a folder of safetensors artefacts and a manifest a user can copy and trust.

    library/manifest.json          format, version, backbone fingerprint, one entry per artefact
    library/adapters/<name>.safetensors
    library/heads/<name>.safetensors
    library/fusions/<name>.safetensors

Every write takes the library's file lock, writes the tensor file atomically, then the manifest
(atomically, last): a killed writer leaves the previous library intact. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adafuse.fusion.errors import UserError, VerificationError
from adafuse.fusion.layout import KIND_FOLDERS
from adafuse.fusion.storage import FileLock, atomic_write, sha256_bytes

FORMAT = "adafuse-library"
VERSION = 1
# router: a task's class means on the bare backbone, for task identification (class-incremental runs)
MANIFEST = "manifest.json"
LOCK = ".lock"  # held while one artefact is written
RUN_LOCK = ".run.lock"  # held by a whole run/fuse job that writes into the library
MAX_HEADER_BYTES = 100 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,+=@-]{0,199}$")
_ENTRY_KEYS = {"name", "kind", "file", "sha256", "fingerprint", "config", "task", "metrics", "created"}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserError(f"artefact name {name!r}: expected letters, digits and . _ , + = @ - (not starting with one)")
    return name


@dataclass
class LoadedArtefact:
    entry: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class AdapterLibrary:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---- manifest -----------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        """The validated manifest; a missing library reads as empty, a broken one raises VerificationError."""
        if not self.exists():
            if self.root.exists() and not self.root.is_dir():
                raise UserError(f"library '{self.root}' is not a folder")
            return {"format": FORMAT, "version": VERSION, "backbone": None, "artefacts": []}
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VerificationError(f"{self.manifest_path}: not valid JSON ({err})") from None
        problems = manifest_problems(manifest)
        if problems:
            raise VerificationError(f"{self.manifest_path}: {problems[0]}")
        return manifest

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.read_manifest()["artefacts"] if kind is None or e["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((e for e in self.entries(kind) if e["name"] == name), None)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        entry = self.find(kind, name)
        if entry is None:
            known = ", ".join(e["name"] for e in self.entries(kind)) or "none"
            raise UserError(f"library '{self.root}' has no {kind} named '{name}' (has: {known})")
        return entry

    # ---- writing ------------------------------------------------------------------------------------------
    def add(
        self,
        kind: str,
        name: str,
        tensors: dict[str, torch.Tensor],
        *,
        fingerprint: str,
        config: dict[str, Any] | None = None,
        task: str | None = None,
        metrics: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Write one artefact (replacing one of the same kind and name) and its manifest entry.

        ``backbone`` (how to load the backbone: a BackboneConfig as a dict) is recorded in the manifest the
        first time it is given, so ``predict``/``export`` can load the right backbone without being told.
        """
        if kind not in KIND_FOLDERS:
            raise UserError(f"unknown artefact kind '{kind}'; expected one of {', '.join(KIND_FOLDERS)}")
        check_name(name)
        data = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        relative = f"{KIND_FOLDERS[kind]}/{name}.safetensors"
        entry = {
            "name": name,
            "kind": kind,
            "file": relative,
            "sha256": sha256_bytes(data),
            "fingerprint": fingerprint,
            "config": config or {},
            "task": task,
            "metrics": metrics or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        with FileLock(self.root / LOCK):
            manifest = self.read_manifest()
            current = manifest.get("backbone") or {}
            self.check_backbone(fingerprint, manifest)
            atomic_write(self.root / relative, data)
            recorded = current.get("config") or backbone
            manifest["backbone"] = {"fingerprint": fingerprint, **({"config": recorded} if recorded else {})}
            artefacts = [e for e in manifest["artefacts"] if (e["kind"], e["name"]) != (kind, name)]
            manifest["artefacts"] = sorted([*artefacts, entry], key=lambda e: (e["kind"], e["name"]))
            self._write_manifest(manifest)
        return entry

    def record_metrics(self, kind: str, name: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Merge ``metrics`` into an existing entry's metrics (the artefact's file is not touched): what a job
        measured of a stored artefact after writing it, e.g. the monitor's test score of a task's adapter."""
        with FileLock(self.root / LOCK):
            manifest = self.read_manifest()
            entry = next((e for e in manifest["artefacts"] if (e["kind"], e["name"]) == (kind, name)), None)
            if entry is None:
                raise UserError(f"library '{self.root}' has no {kind} named '{name}'")
            entry["metrics"] = {**entry.get("metrics", {}), **metrics}
            self._write_manifest(manifest)
        return entry

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        """Atomically replace the manifest (callers hold the library's lock)."""
        atomic_write(self.manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    def check_backbone(self, fingerprint: str, manifest: dict[str, Any] | None = None) -> None:
        """Refuse a backbone other than the one this library's artefacts were trained on."""
        current = (manifest or self.read_manifest()).get("backbone") or {}
        if current and current["fingerprint"] != fingerprint:
            raise UserError(
                f"library '{self.root}' belongs to backbone {current['fingerprint'][:16]}, "
                f"not to this backbone {fingerprint[:16]}"
            )

    # ---- reading ------------------------------------------------------------------------------------------
    def load(self, kind: str, name: str, fingerprint: str | None = None) -> LoadedArtefact:
        """Read one artefact after checking its path, sha256 and (if given) the backbone fingerprint."""
        entry = self.get(kind, name)
        if fingerprint is not None and entry["fingerprint"] != fingerprint:
            raise UserError(
                f"{kind} '{name}' in '{self.root}' was trained on backbone {entry['fingerprint'][:16]}, "
                f"not on the loaded backbone {fingerprint[:16]}"
            )
        path = self.resolve(entry["file"])
        try:
            data = path.read_bytes()
        except OSError as err:
            raise VerificationError(f"{path}: cannot read ({err.strerror})") from None
        if sha256_bytes(data) != entry["sha256"]:
            raise VerificationError(f"{path}: sha256 does not match the manifest (file changed or damaged)")
        return LoadedArtefact(entry, parse_safetensors(data, path))

    def resolve(self, relative: str) -> Path:
        """The artefact path, refused if it leaves the library folder (traversal, absolute, symlink)."""
        problem = path_problem(self.root, relative)
        if problem:
            raise VerificationError(f"library '{self.root}': {problem}")
        return self.root / relative

    # ---- verification -------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Every problem found: bad manifest, missing/changed/malformed/foreign files, stale fusion sources."""
        if not self.manifest_path.is_file():
            return [f"{self.manifest_path}: missing"]
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return [f"{self.manifest_path}: not valid JSON ({err})"]
        problems = manifest_problems(manifest)
        if problems:
            return [f"{self.manifest_path}: {p}" for p in problems]
        known = set()
        by_name = {(e["kind"], e["name"]): e for e in manifest["artefacts"]}
        for entry in manifest["artefacts"]:
            problem = path_problem(self.root, entry["file"])
            if problem:
                problems.append(f"{entry['kind']} '{entry['name']}': {problem}")
                continue
            path = self.root / entry["file"]
            known.add(path.resolve())
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            data = path.read_bytes()
            if sha256_bytes(data) != entry["sha256"]:
                problems.append(
                    f"{path}: sha256 mismatch (expected {entry['sha256'][:16]}, found {sha256_bytes(data)[:16]})"
                )
                continue
            try:
                parse_safetensors(data, path)
            except VerificationError as err:
                problems.append(str(err))
            if entry["kind"] == "fusion":
                problems += [
                    f"fusion '{entry['name']}': source adapter '{name}' is missing or changed"
                    for name in changed_sources(entry, by_name)
                ]
        problems += self._foreign_files(known)
        return problems

    def _foreign_files(self, known: set[Path]) -> list[str]:
        problems = []
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root)
            if (
                path.is_dir()
                and not path.is_symlink()
                and len(relative.parts) == 1
                and path.name in KIND_FOLDERS.values()
            ):
                continue
            if relative.as_posix() in (MANIFEST, LOCK, RUN_LOCK) or path.resolve() in known and not path.is_symlink():
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                continue  # an interrupted write's temp file: harmless, never read
            problems.append(f"{path}: unknown file (not in the manifest)")
        return problems


def changed_sources(fusion: dict[str, Any], entries: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Names of a fusion entry's source adapters that are missing from ``entries`` or have another sha256."""
    changed = []
    for source in fusion.get("sources", []):
        current = entries.get(("adapter", source.get("name")))
        if current is None or current["sha256"] != source.get("sha256"):
            changed.append(source.get("name"))
    return changed


def manifest_problems(manifest: Any) -> list[str]:
    if not isinstance(manifest, dict):
        return ["expected a JSON object"]
    if manifest.get("format") != FORMAT:
        return [f"key 'format': expected '{FORMAT}', found {manifest.get('format')!r}"]
    if manifest.get("version") != VERSION:
        return [f"key 'version': expected {VERSION}, found {manifest.get('version')!r}"]
    artefacts = manifest.get("artefacts")
    if not isinstance(artefacts, list):
        return ["key 'artefacts': expected a list"]
    problems = []
    for index, entry in enumerate(artefacts):
        if not isinstance(entry, dict) or not _ENTRY_KEYS <= set(entry):
            have = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            problems.append(f"artefacts[{index}]: expected keys {sorted(_ENTRY_KEYS)}, found {have}")
        elif entry["kind"] not in KIND_FOLDERS or not isinstance(entry["file"], str):
            problems.append(f"artefacts[{index}]: bad kind {entry['kind']!r} or file {entry['file']!r}")
    return problems


def path_problem(root: Path, relative: str) -> str | None:
    if not isinstance(relative, str) or relative.startswith("/") or "\\" in relative or ".." in Path(relative).parts:
        return f"file path {relative!r} leaves the library folder"
    path = root / relative
    for part in [path, *path.parents]:
        if part == root:
            break
        if part.is_symlink():
            return f"file path {relative!r} goes through a symbolic link"
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return f"file path {relative!r} leaves the library folder"
    return None


def parse_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Check the header's size and JSON before handing the bytes to safetensors."""
    if len(data) < 8:
        raise VerificationError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise VerificationError(f"{path}: malformed safetensors header (declares {header_len} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != len(data):
            raise ValueError("size does not match the header")
        return load_safetensors(data)
    except Exception as err:  # noqa: BLE001 - malformed input of any sort is reported the same way
        raise VerificationError(f"{path}: malformed safetensors file ({err})") from None


def read_foreign_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file from outside a library (an AdapterHub or PEFT folder being imported), under
    the bounded header check the library's own files get: a damaged or hostile file is a user error (one line
    naming the file, exit 2), never an allocation the header asks for."""
    try:
        return parse_safetensors(Path(path).read_bytes(), Path(path))
    except VerificationError as err:
        raise UserError(str(err)) from None
