"""Values computed from weights, kept until one of those weights changes.

A stamp holds each tensor with its version counter (bumped by every in-place write: an optimizer step, a
``load_state_dict``) and its storage (``.to()`` makes a new one), so a memo is reused exactly while all of
its tensors are what they were when it was made.
"""

from __future__ import annotations

import torch


def stamp(tensors) -> list[tuple[torch.Tensor, int, int]]:
    return [(t, t._version, t.data_ptr()) for t in tensors]


def unchanged(old: list, new: list) -> bool:
    """Whether two stamps are of the same tensors at the same versions and storages."""
    return len(old) == len(new) and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(old, new, strict=True))
