"""Plain batched evaluation of whatever the model has active (no Lightning loop overhead).

Under DDP each process takes every world-size-th batch and the predictions are gathered: every rank
gets the single-process result exactly (no padded or repeated examples). Over a sharded backbone (``fsdp``)
every forward pass is a collective, so a process with fewer batches runs spare passes over its first batch
and drops their outputs.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from adafuse.continual.runtime.distributed import gather_tensors, shard
from adafuse.continual.runtime.sharding import is_sharded
from adafuse.fusion.compiling import without_grad
from adafuse.fusion.model import AdaptedModel
from adafuse.tasks.types import TASK_TYPES


def predict_logits(
    model: AdaptedModel, loader, device: torch.device | str | None = None, gather=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (N, C) logits and (N,) labels over ``loader``, in eval mode.

    ``gather(model, inputs, labels)`` turns each batch into outputs and targets (a task type's: tagging keeps the
    scored words, generation decodes).
    The batches move to ``device`` (default: where the model is); the model does not move."""
    with without_grad(model):
        return _predict_logits(model, loader, device, gather)


def _predict_logits(model: AdaptedModel, loader, device, gather) -> tuple[torch.Tensor, torch.Tensor]:
    device = device or model.device
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    shards, mine = shard()
    gather = gather or TASK_TYPES["classification"].gather

    def run(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(device) for k, v in batch.items()}
        return gather(model, batch, batch.pop("labels"))

    spare, seen = None, 0
    try:
        for index, batch in enumerate(tqdm(loader, desc="evaluating", leave=False, disable=not sys.stderr.isatty())):
            spare, seen = spare if spare is not None else batch, index + 1
            if index % shards != mine:
                continue
            output, target = run(batch)
            outputs.append(output.cpu())
            targets.append(target.cpu())
        if is_sharded(model):
            for _ in range(-(-seen // shards) - len(outputs)):  # as many passes as the busiest process
                run(spare)
    finally:
        model.train(was_training)
    empty = torch.empty(0)
    return gather_tensors(torch.cat(outputs) if outputs else empty, torch.cat(targets) if targets else empty)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Classification scores of (N, C) logits: ``score`` (= accuracy), accuracy and macro-F1."""
    return TASK_TYPES["classification"].scores(logits, labels, [])


def evaluate(
    model: AdaptedModel,
    loader,
    device: torch.device | str | None = None,
    task_type: str = "classification",
    label_names: list[str] | None = None,
) -> dict[str, float]:
    """The task type's scores over ``loader``: ``{"score": primary metric, <metric>: value, ...}``."""
    kind = TASK_TYPES[task_type]
    return kind.scores(*predict_logits(model, loader, device, kind.gather), label_names or [])
