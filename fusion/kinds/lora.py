"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models", ICLR, Eq. 3):

    y = W x + b + (alpha / r) * B A x        A: (r, in), B: (out, r); B starts at zero (identity at init)

One module per adapted projection, inside a :class:`~adafuse.fusion.slot.ProjectionSlot`. The delta can be
merged into W for inference (:meth:`delta_weight`), after which the adapted model runs at the bare model's
cost. Parameter names are AdapterHub's and PEFT's (``lora_A``, ``lora_B``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and AdapterHub
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, (out, in): what merging adds to the projection's weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta (alpha / r) B A x: (..., in) -> (..., out); the slot adds it to W x + b."""
        return (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
