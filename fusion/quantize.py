"""Quantized frozen backbones (``backbone.quantization``), through torchao (PyTorch's quantization library):

* ``int8``: int8 weights with one scale per output channel (torchao ``Int8WeightOnlyConfig``): a quarter of the
  float32 weight memory, half of bfloat16's;
* ``nf4``: 4-bit NormalFloat weights with a scale per block of 64 values (QLoRA's format; torchao ``to_nf4``):
  an eighth of float32's; they compute in ``backbone.dtype`` (bfloat16 is QLoRA's choice).

Every ``nn.Linear`` of the backbone is quantized; embeddings and norms are not. Adapters of every kind (LoRA
beside its quantized projection), fusion and heads keep their float32 weights, and gradients flow through the
quantized projections to them. torchao was chosen because the same code runs on the CPU (tested here) and on
CUDA, and it installs as a wheel beside torch; bitsandbytes' 4-bit layers target CUDA. The fingerprint is
taken before quantizing, so a library trained on the quantized backbone names the backbone's own weights.

What a training step keeps for the backward pass: torchao's int8 linear multiplies by its int8 values cast to
``backbone.dtype`` and hands that copy to autograd, which keeps it until the backward pass - every quantized
projection's weight again, for the whole step (measured at Llama-3.2-1B's size: the int8 step's peak above
bfloat16's). Here a frozen int8 projection keeps its int8 weight instead and casts it again in the backward
pass (:class:`_FrozenInt8Linear`, in torchao's order of operations: the gradients are bit-identical). nf4
weights already keep themselves (torchao's own autograd function).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from adafuse.fusion.errors import UserError

QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCK = 64  # values per scale, as QLoRA


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight held as a quantized tensor subclass (torchao's), not plain values that can be added to."""
    return type(weight) not in (nn.Parameter, torch.Tensor)


def quantize(model: nn.Module, mode: str) -> int:
    """Quantize every ``nn.Linear`` of ``model`` in place; returns how many were quantized."""
    if mode == "none":
        return 0
    try:
        import torchao.quantization as ao
    except ImportError:
        raise UserError(
            f"backbone.quantization: {mode} needs torchao (pip install 'adafuse[quant]' or pip install torchao)"
        ) from None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"backbone.quantization: the {model.config.model_type} backbone has no nn.Linear projections to quantize "
            "(GPT-2's are Conv1D); use quantization: none"
        )
    if mode == "int8":
        ao.quantize_(model, ao.Int8WeightOnlyConfig(), filter_fn=lambda module, _: isinstance(module, nn.Linear))
        for module in linears:
            module.forward = types.MethodType(_int8_forward, module)
        return len(linears)
    uneven = [m for m in linears if m.weight.numel() % NF4_BLOCK]
    if uneven:
        raise UserError(
            f"backbone.quantization: nf4 quantizes blocks of {NF4_BLOCK} weights; a {tuple(uneven[0].weight.shape)} "
            "projection does not divide into them"
        )
    for module in linears:
        blocks = module.weight.numel() // NF4_BLOCK
        scaler = next(size for size in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % size == 0)
        weight = ao.to_nf4(module.weight.detach(), block_size=NF4_BLOCK, scaler_block_size=scaler)
        module.weight = nn.Parameter(weight, requires_grad=False)
    return len(linears)


class _FrozenInt8Linear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a frozen int8 ``weight`` that keeps the int8 weight for the backward pass
    (not the copy in ``x``'s dtype autograd would keep) and casts it again there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        if weight.block_size[-1] < weight.qdata.shape[-1]:  # scales per group: torchao's forward ran the dequantized
            out = rows.mm(weight.dequantize().to(grad.dtype))  # weight
        else:  # a scale per row: it ran the int8 values, then scaled the product (the same steps backwards)
            out = (rows * weight.scale.to(grad.dtype).flatten()).mm(weight.qdata.to(grad.dtype))
        return out.reshape(*grad.shape[:-1], out.shape[-1]), None, None


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if frozen and x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _FrozenInt8Linear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)
