"""What a bfloat16 (or float16) backbone keeps for the backward pass, kept in its own dtype.

A narrow backbone still computes a few things in float32: its RMS norms upcast their input to take the
variance (Llama, Mistral, Qwen2, T5), and the adapters and fusions run on float32 master weights, so the slot
hands them a float32 copy of the hidden states. Autograd keeps those float32 copies until the backward pass:
measured on a 2-block Qwen2.5-0.5B-width model, 40 of the 133 MB a bfloat16 training step saved were float32.

Here those regions save only their narrow inputs and are recomputed in the backward pass
(``torch.utils.checkpoint``, non-reentrant). Widening is exact and the recomputation runs the same operators
on the same values, so every output and gradient is bit-identical to keeping the float32 copies; the cost is
the recomputed norm or adapter (a small part of a block's arithmetic). Nothing changes for float32
backbones, in evaluation (no graph is kept), or under ``torch.compile`` (the compiler plans its own memory).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

NARROW = (torch.bfloat16, torch.float16)


def recompute_in_backward(function: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``function(*args)``, keeping only ``args`` for the backward pass where a graph is being recorded (the one
    place to switch the recomputation off, e.g. to measure what it saves)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _saves_narrow(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:  # a trained norm (full fine-tuning) keeps autograd's own bookkeeping
        return type(self).forward(self, x)
    return recompute_in_backward(type(self).forward.__get__(self), x)


def _is_upcasting_norm(module: nn.Module) -> bool:
    """An RMS norm that takes its variance in float32 (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm,
    T5LayerNorm, ...) with narrow weights."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        (name.endswith("RMSNorm") or name == "T5LayerNorm")
        and isinstance(weight, torch.Tensor)
        and (weight.dtype in NARROW)
    )


def narrow_norms(model: nn.Module) -> int:
    """Make every upcasting RMS norm of a narrow ``model`` save its narrow input only; returns how many."""
    count = 0
    for module in model.modules():
        if _is_upcasting_norm(module):
            module.forward = types.MethodType(_saves_narrow, module)
            count += 1
    return count
