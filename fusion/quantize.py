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
"""

from __future__ import annotations

import torch
import torch.nn as nn

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
