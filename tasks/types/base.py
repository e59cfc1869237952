"""What every task type shares unless it says otherwise (see :mod:`adafuse.tasks.types`)."""

from __future__ import annotations

import torch

from adafuse.fusion.errors import UserError

NOT_MODEL_INPUTS = ("labels", "example_index")  # batch columns the model does not read


class TaskType:
    name = ""
    head_type = ""
    primary = ""
    labelled = True  # a label set, read from the train split
    one_label_per_input = False  # one label per example (a pooled head): what source ranking scores
    inputs = "text"  # what an example is: text (a string, or a list of words) or pixels (an image)

    def check_backbone(self, sites, task: str) -> None:
        """Refuse a backbone this type cannot serve (one line naming the task); text types need text."""
        if sites.inputs != "text":
            raise UserError(f"task '{task}': a {self.name} task needs a text backbone; this one reads {sites.inputs}")

    def check_padding(self, pad_to_multiple_of: int | None, task: str) -> None:
        """Refuse ``trainer.pad_to_multiple_of`` where the type cannot pad to it (one line naming the task)."""

    def head_for(self, sites) -> str:
        """The head type on a backbone (the same on every one, unless a type says otherwise)."""
        return self.head_type

    def model_batch(self, model, batch: dict) -> tuple[dict, torch.Tensor]:
        """What the model reads of a batch, and the labels its head's logits are scored against."""
        return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}, batch["labels"]


def group_rows(keys: list[str]) -> dict[str, list[int]]:
    """Row indices per key, in first-seen order: ``["a", "b", "a"]`` -> ``{"a": [0, 2], "b": [1]}``."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return groups
