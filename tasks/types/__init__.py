"""Task types: what a task's data looks like, which head reads it, its loss and its primary metric.

A type is one object behind a small protocol, so that loading, training, the monitor, fusion and reports
never branch on the type (see DESIGN.md, "Breadth without branches"):

* ``labelled`` (a label set read from train) and ``check_backbone(sites, task)`` (refuses a backbone that
  cannot serve the type, e.g. generation on an encoder);
* ``columns(spec)`` / ``row_labels(row, spec)`` / ``split_data(rows, spec, index, split)``: reading user rows
  (every bad row is a :class:`UserError` naming the task, split, row and column);
* ``encode(split, tokenizer, max_length, cache_dir)`` and ``collator(tokenizer)``: tokenised datasets and
  batches with ``labels``;
* ``head_type`` (a key of :data:`adafuse.fusion.heads.HEAD_TYPES`) and ``loss(logits, labels)``;
* ``metric_inputs(logits, labels)``: (preds, target) for the torchmetrics logged during training;
* ``gather(logits, labels)`` per evaluation batch and ``scores(gathered..., label_names)`` over a split:
  ``{"score": primary metric, <metric name>: value, ...}``; ``primary`` names the metric behind ``score``;
* ``predict(model, tokenizer, texts, tasks, max_length, skip_layers, label_names)``: the rows ``adafuse
  predict`` writes (a label and probabilities; a tag per word; generated text).
"""

from __future__ import annotations

from adafuse.fusion.errors import UserError
from adafuse.tasks.types.classification import Classification
from adafuse.tasks.types.generation import Generation
from adafuse.tasks.types.image import ImageClassification
from adafuse.tasks.types.tagging import Tagging

TASK_TYPES = {t.name: t for t in (Classification(), Tagging(), Generation(), ImageClassification())}


def task_type(name: str):
    """The task type called ``name``; an unknown name is a one-line :class:`UserError`."""
    if name not in TASK_TYPES:
        raise UserError(f"task type '{name}' is not one of {', '.join(TASK_TYPES)}")
    return TASK_TYPES[name]
