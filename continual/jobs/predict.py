"""``adafuse predict``: label a file with a library adapter or fusion, or with one per row (mixed tasks).

Input: CSV/TSV (a ``text`` column), JSONL (objects with ``text``, or strings) or plain text (one text a
line). Output: one JSON line per input row, in order, as the task's type writes it: classification
``label``, ``label_name`` and ``probabilities`` (label-id order); tagging ``words`` (the text split at
whitespace, or a JSON list of words) and one of ``tags`` per word. With ``task_column`` each row names
its adapter or fusion; rows of different tasks (of one type) share one forward pass
(:meth:`AdaptedModel.route`) and each task's head reads its rows.
The output is written to a temporary file and renamed at the end: an error leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from adafuse.continual.config import HeadConfig
from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.continual.jobs.predictor import Predictor, autocast_dtype, device_for
from adafuse.continual.routing.lda import LdaRouter
from adafuse.continual.routing.trained import TrainedRouter, stored_router
from adafuse.fusion.compiling import MODES
from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.storage import staged_file

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def read_rows(path: Path, text_column: str, task_column: str | None) -> Iterator[tuple[str, str | None]]:
    """(text, task) per input row, streamed; bad rows raise a UserError naming the file and line."""
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise UserError(f"--input '{path}': {err.strerror}") from None
    with handle:
        try:
            if path.suffix.lower() in TEXT_SUFFIXES:
                reader = csv.DictReader(handle, delimiter=TEXT_SUFFIXES[path.suffix.lower()])
                for column in (text_column, task_column):
                    if column is not None and column not in (reader.fieldnames or []):
                        raise UserError(f"{path}: no column '{column}' (found: {', '.join(reader.fieldnames or [])})")
                for row in reader:
                    yield row[text_column] or "", row[task_column] if task_column else None
            elif path.suffix.lower() in (".jsonl", ".json"):
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield _json_row(line, path, number, text_column, task_column)
            else:
                if task_column is not None:
                    raise UserError(f"{path}: --task-column needs a CSV, TSV or JSONL input, not plain text")
                for line in handle:
                    if line.strip():
                        yield line.rstrip("\r\n"), None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except csv.Error as err:
            raise UserError(f"{path}: malformed CSV ({err})") from None


def _json_row(line: str, path: Path, number: int, text_column: str, task_column: str | None):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {number}: not valid JSON ({err.msg})") from None
    if isinstance(row, str) and task_column is None:
        return row, None
    if not isinstance(row, dict):
        found = type(row).__name__
        raise UserError(f"{path} line {number}: expected a JSON object with '{text_column}', found {found}")
    words = row.get(text_column)
    if isinstance(words, list) and all(isinstance(w, str) for w in words):  # tagging: a list of words
        text_column = None
    for column in (text_column, task_column):
        if column is not None and not isinstance(row.get(column), str):
            what = "a string (or, for tagging, a list of words)" if column == text_column else "a string"
            raise UserError(f"{path} line {number}: expected {what} in field '{column}'")
    return words, row[task_column] if task_column else None


def _batches(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Router:
    """Names each row's task with the library's routers: the trained router of the latest routed task where the
    run trained one (:mod:`.trained_router`), else LDA over every task's statistics (:mod:`.router`)."""

    def __init__(self, predictor: Predictor) -> None:
        opened = predictor.opened
        library = opened.library
        entries = library.entries("router")
        if not entries:
            raise UserError(
                f"predict --task auto: '{library.root}' has no routers (a run with setting: class-incremental "
                "stores one per task)"
            )
        self.predictor = predictor
        latest = entries[-1]
        trained = stored_router(latest)
        if trained.get("kind") == "trained":  # the latest task's router knows every task before it
            self.names = trained["tasks"]
            head = HeadConfig(**{k: v for k, v in latest["config"]["head"].items() if k in ("pooling", "dropout")})
            adapter = AdapterConfig(**latest["config"]["adapter"])
            tensors = library.load("router", latest["name"], opened.fingerprint).tensors
            self.route = TrainedRouter(opened.model, tensors, trained["owners"], adapter, head)
        else:
            self.names = [e["name"] for e in entries]
            statistics = [library.load("router", name, opened.fingerprint).tensors for name in self.names]
            self.route = LdaRouter(opened.model, statistics)
        for name in self.names:
            predictor.add_task(name)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[str]:
        opened, device = self.predictor.opened, self.predictor.device
        encoded = opened.tokenizer(
            texts, truncation=True, max_length=self.predictor.max_length, padding=True, return_tensors="pt"
        )
        return [self.names[t] for t in self.route({k: v.to(device) for k, v in encoded.items()}).tolist()]


def run_predict(
    library_dir: Path,
    input_path: Path,
    out_path: Path,
    *,
    adapter: str | None = None,
    fusion: str | None = None,
    task_column: str | None = None,
    task: str | None = None,
    text_column: str = "text",
    batch_size: int = 32,
    max_length: int = 128,
    device: str = "cpu",
    drop_layers: int = 0,
    backbone: str | None = None,
    merge: bool = False,
    compile: str = "off",
    precision: str = "32",
) -> int:
    """Predict every row of ``input_path`` into ``out_path`` (JSONL); returns the number of rows.

    ``merge`` folds a LoRA ``adapter`` into the backbone's weights first (the bare backbone's speed).
    ``task="auto"`` identifies each row's task with the library's routers (:mod:`.router`). ``compile`` runs the
    forward through ``torch.compile`` in that mode (generation's decoding steps stay eager). ``precision``
    (``32``, ``bf16-mixed``, ``16-mixed`` on CUDA) runs the forward passes under that autocast."""
    if sum(x is not None for x in (adapter, fusion, task_column, task)) != 1:
        raise UserError(
            "predict: give exactly one of --adapter NAME, --fusion NAME, --task-column COLUMN or --task auto"
        )
    if merge and adapter is None:
        raise UserError("predict --merge: needs --adapter NAME (one LoRA adapter folds into the weights)")
    if compile not in MODES or compile == "auto":
        raise UserError(f"predict --compile '{compile}': expected one of off, default, reduce-overhead, max-autotune")
    if batch_size < 1 or max_length < 2:
        raise UserError(f"predict: --batch-size ({batch_size}) must be >= 1 and --max-length ({max_length}) >= 2")
    input_path, out_path = Path(input_path), Path(out_path)
    if not input_path.is_file():
        raise UserError(f"--input '{input_path}': file not found")
    if out_path.is_dir():
        raise UserError(f"--out '{out_path}' is a folder; expected a .jsonl file path")
    device = device_for(device)
    autocast = autocast_dtype(precision, device)  # refused before the backbone loads
    opened = LibraryModel.open(library_dir, backbone, device=device)
    predictor = Predictor(opened, max_length, device, drop_layers, autocast)
    fixed = adapter or fusion
    if fixed:
        predictor.add_task(fixed)
    router = Router(predictor) if task == "auto" else None
    if merge:
        predictor.opened.model.merge_adapter(adapter)
    predictor.opened.model.compile_mode = compile
    count = 0
    with staged_file(out_path, "w", encoding="utf-8") as out, tqdm(unit=" rows", desc="predict", disable=None) as bar:
        for batch in _batches(read_rows(input_path, text_column, task_column), batch_size):
            tasks = router([t for t, _ in batch]) if router else [fixed or task for _, task in batch]
            for offset, task in enumerate(tasks):
                predictor.add_task(task, f"{input_path} row {count + offset + 1}: ")
            for task, result in zip(tasks, predictor([t for t, _ in batch], tasks), strict=True):
                out.write(json.dumps(result if fixed else {"task": task, **result}) + "\n")
            count += len(batch)
            bar.update(len(batch))
        if count == 0:
            raise UserError(f"--input '{input_path}': no rows to predict")
    return count
