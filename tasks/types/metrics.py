"""The torchmetrics side of the task types: what training logs, and the scores evaluation writes.

The task types import this module when a metric is first needed, so ``adafuse predict`` and ``adafuse serve``
start without torchmetrics (its import pulls in scipy and costs seconds at every start)."""

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def label_metrics(num_labels: int, prefix: str) -> MetricCollection:
    """Accuracy and macro-F1 over ``num_labels`` classes, logged under ``prefix``."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
        },
        prefix=prefix,
    )


def token_metrics(prefix: str) -> MetricCollection:
    """Teacher-forced token accuracy, logged as ``accuracy`` under ``prefix``."""
    return MetricCollection({"accuracy": TokenAccuracy()}, prefix=prefix)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Share of the (N,) ``predictions`` equal to the (N,) ``labels``."""
    return float(multiclass_accuracy(predictions, labels, num_classes=classes, average="micro"))


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """F1 of each of ``classes``, averaged with equal weights."""
    return float(multiclass_f1_score(predictions, labels, num_classes=classes, average="macro"))


class TokenAccuracy(Metric):
    """Share of the (N,) targets that the (N, V) logits' argmax names (no class count needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += (logits.argmax(-1) == target).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp_min(1)
