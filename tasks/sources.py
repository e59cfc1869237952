"""Loading user data through ``datasets``: files, folders or (online) Hub datasets -> TaskData.

Every mistake a user can make here is a :class:`UserError` naming the file, column or value and what
was expected. Text that is not valid UTF-8 is decoded with replacement characters and reported as a
warning with the count of replaced characters.
"""

from __future__ import annotations

import random
import re
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

from adafuse.fusion.errors import UserError, first_line
from adafuse.fusion.storage import atomic_write, sha256_bytes
from adafuse.tasks.spec import SPLITS, TaskData, TaskSpec
from adafuse.tasks.types import task_type

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
INTEGER = re.compile(r"-?[0-9]+")  # label values sorted as numbers (str.isdigit also accepts '¹', int does not)
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def _format_of(path: Path) -> str:
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"{path}: unknown format '{path.suffix or '(no extension)'}'; expected one of {', '.join(FORMATS)}"
        )
    return FORMATS[path.suffix.lower()]


def _clean_text_file(path: Path, cache_dir: Path | None) -> Path:
    """Return ``path``, or a UTF-8 copy of it in ``cache_dir`` when it holds invalid UTF-8 (with a warning)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        return path
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    warnings.warn(f"{path}: not valid UTF-8; {replaced} character(s) replaced by U+FFFD", stacklevel=2)
    if cache_dir is None:
        cache_dir = Path(tempfile.gettempdir()) / "adafuse-utf8"
    clean = Path(cache_dir) / f"utf8-{sha256_bytes(raw)[:16]}{path.suffix}"
    if not clean.exists():
        atomic_write(clean, text.encode("utf-8"))
    return clean


def _load_file(path: Path, cache_dir: Path | None):
    from datasets import load_dataset

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    fmt = _format_of(path)
    if fmt != "parquet":
        path = _clean_text_file(path, cache_dir)
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return load_dataset(
            fmt, data_files=str(path), split="train", cache_dir=str(cache_dir) if cache_dir else None, **kwargs
        )
    except Exception as err:  # noqa: BLE001 - any parser failure is the user's file
        if "corresponds to no data" in str(err):
            raise UserError(f"{path}: the file has no rows (empty split)") from None
        raise UserError(f"{path}: could not be read as {fmt} ({type(err).__name__}: {first_line(err, 200)})") from None


def _find_split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for path in sorted(folder.iterdir()):
            if path.stem.lower() in aliases and path.suffix.lower() in FORMATS:
                found[split] = path
                break
    if "train" not in found:
        raise UserError(f"{folder}: no train file found (expected train.csv/.tsv/.json/.jsonl/.parquet)")
    return found


def _raw_splits(spec: TaskSpec, base_dir: Path, cache_dir: Path | None) -> dict:
    import datasets

    if not sys.stderr.isatty():  # progress bars only on a terminal, not in logs and captured output
        datasets.disable_progress_bars()
    source = Path(spec.source).expanduser()
    if not source.is_absolute():
        source = base_dir / source
    if spec.splits:
        unknown = set(spec.splits) - set(SPLITS)
        if unknown:
            raise UserError(
                f"task '{spec.name}': unknown split names {sorted(unknown)} in 'splits'; expected {list(SPLITS)}"
            )
        if "train" not in spec.splits:
            raise UserError(f"task '{spec.name}': 'splits' has no 'train' entry")
        if source.exists() or any(Path(v).suffix.lower() in FORMATS for v in spec.splits.values()):
            folder = source if source.is_dir() else source.parent
            return {split: _load_file(folder / name, cache_dir) for split, name in spec.splits.items()}
        return _load_hub(spec, spec.splits)
    if source.is_dir() and (source / "train").is_dir():
        return _load_image_folder(spec, source, cache_dir)
    if source.is_dir():
        return {split: _load_file(path, cache_dir) for split, path in _find_split_files(source).items()}
    if source.is_file() or source.suffix or str(spec.source).startswith((".", "/", "~")):
        return {"train": _load_file(source, cache_dir)}
    return _load_hub(spec, {s: s for s in SPLITS})


def _load_image_folder(spec: TaskSpec, source: Path, cache_dir: Path | None) -> dict:
    """``datasets``' imagefolder: ``train/<class>/<image>`` (validation/, test/ alike); labels become names."""
    from datasets import Image, load_dataset

    try:
        loaded = load_dataset("imagefolder", data_dir=str(source), cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # noqa: BLE001 - any failure here is the user's folder
        raise UserError(
            f"task '{spec.name}': {source} could not be read as an image folder ({first_line(err, 200)})"
        ) from None
    splits = {}
    for name, dataset in loaded.items():
        names = dataset.features["label"].names  # the class folders, in label-id order
        dataset = dataset.cast_column("image", Image(decode=False))  # decoded (and checked) by the task type
        splits[name] = dataset.remove_columns("label").add_column("label", [names[i] for i in dataset["label"]])
    return splits


def _load_hub(spec: TaskSpec, splits: dict[str, str]) -> dict:
    from datasets import load_dataset

    try:
        loaded = load_dataset(spec.source)
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"task '{spec.name}': source '{spec.source}' is not a file or folder, and loading it as a Hub dataset "
            f"failed ({type(err).__name__}; needs network access)"
        ) from None
    return {split: loaded[name] for split, name in splits.items() if name in loaded}


def _check_ratio(spec: TaskSpec, key: str, value: float | None) -> float | None:
    if value is not None and not 0.0 < value < 1.0:
        raise UserError(f"task '{spec.name}': {key} = {value} must be strictly between 0 and 1")
    return value


def _carve(rows: list[dict], spec: TaskSpec, missing: list[str]) -> dict[str, list[dict]]:
    """Split train rows into the missing validation/test splits, seeded."""
    ratios = {
        "validation": _check_ratio(spec, "validation_ratio", spec.validation_ratio),
        "test": _check_ratio(spec, "test_ratio", spec.test_ratio),
    }
    ratios = {split: (ratios[split] or 0.1) for split in missing}
    if sum(ratios.values()) >= 1.0:
        raise UserError(f"task '{spec.name}': validation_ratio + test_ratio = {sum(ratios.values())} must be < 1")
    order = list(range(len(rows)))
    random.Random(spec.split_seed).shuffle(order)
    carved, start = {}, 0
    for split, ratio in ratios.items():
        count = max(1, round(ratio * len(rows)))
        carved[split] = [rows[i] for i in order[start : start + count]]
        start += count
    carved["train"] = [rows[i] for i in order[start:]]
    return carved


def load_user_task(spec: TaskSpec, base_dir: Path = Path("."), cache_dir: Path | None = None) -> TaskData:
    """Read, check and label-encode a user task."""
    if not spec.source:
        raise UserError(f"task '{spec.name}': needs a 'source' (file, folder or Hub dataset name)")
    for key in ("validation_ratio", "test_ratio"):
        _check_ratio(spec, key, getattr(spec, key))
    kind = task_type(spec.type)
    source = Path(spec.source).expanduser()
    source = source if source.is_absolute() else base_dir / source
    if source.exists():  # a file or folder (not a Hub name): absolute, so that image paths resolve against it
        spec = replace(spec, source=str(source))
    datasets = _raw_splits(spec, base_dir, cache_dir)
    columns = kind.columns(spec)
    rows = {}
    for split, dataset in datasets.items():
        absent = [c for c in columns if c not in dataset.column_names]
        if absent:
            found = dataset.column_names
            raise UserError(f"task '{spec.name}', {split} split: column(s) {absent} not found; columns found: {found}")
        rows[split] = dataset.select_columns(columns).to_list()
    missing = [s for s in ("validation", "test") if s not in rows]
    if missing:
        rows.update(_carve(rows["train"], spec, missing))
    for split in SPLITS:
        if not rows[split]:
            raise UserError(f"task '{spec.name}': the {split} split is empty")
    seen = {_label_key(v) for r in rows["train"] for v in kind.row_labels(r, spec)}
    label_names, ids = _label_ids(spec, seen)

    def index(value, where: str) -> int:
        if _label_key(value) not in ids:
            raise UserError(
                f"task '{spec.name}', {where}: label {_label_key(value)!r} not seen in train (train labels: "
                f"{label_names})"
            )
        return ids[_label_key(value)]

    splits = {split: kind.split_data(rows[split], spec, index, split) for split in SPLITS}
    if kind.labelled and len(seen) < 2:
        only = label_names[ids[next(iter(seen))]] if seen else "none"
        raise UserError(f"task '{spec.name}': the train split has a single class ({only!r})")
    return TaskData(spec.name, label_names, splits, spec.max_length, spec.type)


def _label_key(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _label_ids(spec: TaskSpec, seen: set[str]) -> tuple[list[str], dict[str, int]]:
    """Label names in id order and the id of every label value (a name, or an integer id into label_names)."""
    if not spec.label_names:
        names = sorted(seen, key=lambda s: (0, int(s)) if INTEGER.fullmatch(s) else (1, s))
        return names, {name: i for i, name in enumerate(names)}
    names = [str(n) for n in spec.label_names]
    if len(set(names)) != len(names):
        raise UserError(f"task '{spec.name}': label_names has duplicates: {names}")
    if seen <= {str(i) for i in range(len(names))} and not seen <= set(names):  # integer ids into label_names
        return names, {str(i): i for i in range(len(names))}
    unknown = seen - set(names)
    if unknown:
        raise UserError(f"task '{spec.name}': train labels {sorted(unknown)} are not in label_names {names}")
    return names, {name: i for i, name in enumerate(names)}
