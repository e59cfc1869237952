"""bfloat16 frozen projections computed in float32 on a CPU without bf16 instructions.

There PyTorch runs a bfloat16 matmul through a slow reference path: a MiniLM-sized decoder's training step was
measured 24 times slower than in float32 and peaking above float32's memory. The weights are what take the
memory, not the products, so each ``nn.Linear`` of a bfloat16 backbone keeps its bfloat16 weight and, on such
a CPU, multiplies in float32: the weight is widened for one product at a time and dropped again (the backward
widens it once more instead of keeping the float32 copy), and the output goes back to bfloat16. Where the
hardware multiplies bfloat16 itself (CUDA, CPUs with AVX512-BF16 or AMX) the projection runs as it always does.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matmul instructions (Linux: /proc/cpuinfo's flags; elsewhere oneDNN's
    own check, which also counts emulated support)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(flag in flags for flag in BF16_FLAGS)


CPU_WIDENS = not cpu_has_bf16()  # read once: forward passes (and compiled code) only test a constant


class _WidenedLinear(torch.autograd.Function):
    """y = x W^T + b in float32, returned in x's dtype; W is frozen, so only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the narrow weight, not its float32 copy
        wide = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return wide.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = (grad.float() @ weight.float()).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if CPU_WIDENS and x.device.type == "cpu" and x.dtype == torch.bfloat16 and not self.weight.requires_grad:
        return _WidenedLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def widen_bf16_linears(model: nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` with bfloat16 weights the forward above; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and type(module.weight) is nn.Parameter and module.weight.dtype == torch.bfloat16:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
