"""Plain batched evaluation of whatever the model has active (no Lightning loop overhead).

Under DDP each process takes every world-size-th batch and the predictions are gathered: every rank
gets the single-process result exactly (no padded or repeated examples).
"""

from __future__ import annotations

import sys

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
from tqdm.auto import tqdm

from adafuse.fusion.model import AdaptedModel

from .distributed import gather_tensors, shard


@torch.inference_mode()
def predict_logits(
    model: AdaptedModel, loader, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (N, C) logits and (N,) labels over ``loader``, in eval mode.

    The batches move to ``device`` (default: where the model is); the model does not move."""
    device = device or model.device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    shards, mine = shard()
    try:
        for index, batch in enumerate(tqdm(loader, desc="evaluating", leave=False, disable=not sys.stderr.isatty())):
            if index % shards != mine:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            target = batch.pop("labels")
            logits.append(model(**batch).float().cpu())
            labels.append(target.cpu())
    finally:
        model.train(was_training)
    empty = torch.empty(0)
    return gather_tensors(torch.cat(logits) if logits else empty, torch.cat(labels) if labels else empty)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    num_classes = logits.shape[-1]
    predictions = logits.argmax(-1)
    return {
        "accuracy": float(multiclass_accuracy(predictions, labels, num_classes=num_classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(predictions, labels, num_classes=num_classes, average="macro")),
    }


def evaluate(model: AdaptedModel, loader, device: torch.device | str | None = None) -> dict[str, float]:
    return scores(*predict_logits(model, loader, device))
