"""Sequence classification: a text (or text pair) and one label; accuracy, macro-F1 beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from adafuse.tasks.spec import SplitData, TaskSpec
from adafuse.tasks.tokenize import tokenize_split
from adafuse.tasks.types.base import TaskType, group_rows

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


class Classification(TaskType):
    name = "classification"
    head_type = "classification"
    primary = "accuracy"
    one_label_per_input = True

    def columns(self, spec: TaskSpec) -> list[str]:
        return [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])

    def row_labels(self, row: dict, spec: TaskSpec) -> list:
        return [row[spec.label_column]]

    def split_data(self, rows: list[dict], spec: TaskSpec, index, split: str) -> SplitData:
        """``index(value, where)`` maps a label to its id (or raises naming ``where``)."""
        return SplitData(
            texts=[_text(r[spec.text_column]) for r in rows],
            labels=[index(r[spec.label_column], f"{split} split, row {n}") for n, r in enumerate(rows)],
            pairs=[_text(r[spec.text_pair_column]) for r in rows] if spec.text_pair_column else None,
        )

    def example(self, text, label: int, label_names: list[str]) -> dict:
        """One example as a row of a data file this type reads (``tasks export``)."""
        return {"text": text, "label": label, "label_name": label_names[label]}

    def encode(self, split: SplitData, tokenizer, max_length: int, cache_dir=None):
        return tokenize_split(split, tokenizer, max_length, cache_dir)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)  # (B, C), (B,)

    def metrics(self, num_labels: int, prefix: str) -> MetricCollection:
        """What training logs (``accuracy`` picks the best epoch): accuracy and macro-F1 of ``metric_inputs``."""
        from adafuse.tasks.types.metrics import label_metrics

        return label_metrics(num_labels, prefix)

    def metric_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, labels

    def gather(self, model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One evaluation batch: (B, C) logits and (B,) labels."""
        return model(**inputs).float(), labels

    def scores(self, logits: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict[str, float]:
        from adafuse.tasks.types.metrics import accuracy, macro_f1

        predictions, classes = logits.argmax(-1), logits.shape[-1]
        share = accuracy(predictions, labels, classes)
        return {"score": share, "accuracy": share, "macro_f1": macro_f1(predictions, labels, classes)}

    def predict(self, model, tokenizer, texts: list, tasks: list[str], max_length: int, skip_layers: int, names):
        return one_pass(self, model, tokenizer, texts, tasks, max_length, skip_layers, names)

    def predict_inputs(self, texts: list, tokenizer, max_length: int) -> tuple[dict, list]:
        """A padded batch of ``texts`` for ``adafuse predict``, and what :meth:`predictions` needs per row."""
        texts = [" ".join(t) if isinstance(t, list) else t for t in texts]  # a JSON list of words: one text
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return encoded, [None] * len(texts)

    def predictions(self, logits: torch.Tensor, contexts: list, label_names: list[str]) -> list[dict]:
        """One output row per (C,) logits: label id, label name and the probabilities in label-id order."""
        probabilities = torch.softmax(logits.float(), dim=-1).cpu()
        return [
            {"label": label, "label_name": label_names[label], "probabilities": p}
            for label, p in zip(probabilities.argmax(-1).tolist(), probabilities.tolist(), strict=True)
        ]


@torch.no_grad()
def one_pass(kind, model, tokenizer, texts: list, tasks: list[str], max_length: int, skip_layers: int, names):
    """``adafuse predict`` for types read off one forward pass: rows of every task share it (routed), then
    each task's head reads its rows and ``kind.predictions`` writes them. ``names``: task -> label names."""
    encoded, contexts = kind.predict_inputs(texts, tokenizer, max_length)
    inputs = {key: value.to(model.device) for key, value in encoded.items()}  # token ids and mask, or pixels
    mask = inputs.get("attention_mask")
    groups = group_rows(tasks)
    rows = {task: torch.tensor(index, device=model.device) for task, index in groups.items()}
    model.route(rows, skip_layers=skip_layers)
    hidden = model.encode(**inputs)  # (B, L, d)
    results: list[dict | None] = [None] * len(texts)
    for task, index in rows.items():
        logits = model.heads[task](hidden[index], None if mask is None else mask[index])
        outputs = kind.predictions(logits, [contexts[r] for r in groups[task]], names[task])
        for row, output in zip(groups[task], outputs, strict=True):
            results[row] = output
    return results


def _text(value) -> str:
    return "" if value is None else str(value)
