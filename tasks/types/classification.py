"""Sequence classification: a text (or text pair) and one label; accuracy, macro-F1 beside it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from ..spec import SplitData, TaskSpec
from ..tokenize import tokenize_split


class Classification:
    name = "classification"
    head_type = "classification"
    primary = "accuracy"

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

    def encode(self, split: SplitData, tokenizer, max_length: int, cache_dir=None):
        return tokenize_split(split, tokenizer, max_length, cache_dir)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)  # (B, C), (B,)

    def metric_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, labels

    def gather(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.float(), labels

    def scores(self, logits: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict[str, float]:
        predictions, classes = logits.argmax(-1), logits.shape[-1]
        accuracy = float(multiclass_accuracy(predictions, labels, num_classes=classes, average="micro"))
        macro_f1 = float(multiclass_f1_score(predictions, labels, num_classes=classes, average="macro"))
        return {"score": accuracy, "accuracy": accuracy, "macro_f1": macro_f1}

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


def _text(value) -> str:
    return "" if value is None else str(value)
