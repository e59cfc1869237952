"""Weighted composition of library LoRA modules for a new target (LoraHub; Huang et al. 2024, "LoraHub:
Efficient Cross-Task Generalization via Dynamic LoRA Composition", COLM, Eq. 1 read as a sum of deltas):

    y = W x + b + sum_n w_n (alpha_n / r_n) B_n A_n x          w: one weight per source, shared by every layer

The K weights start at zero (the composition is inert: the bare backbone) and are learned on the few-shot
target together with its head, by gradient with an L1 penalty l1 * sum_n |w_n| (LoraHub's regulariser); a
gradient-free search over w (LoraHub's own optimiser is derivative-free) is :mod:`adafuse.continual.training.search`.
LoRA deltas live inside projections, so this composition sits in each :class:`ProjectionSlot` that the
sources adapt; the one weight vector is the same Parameter in every slot.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class WeightedSum(nn.Module):
    def __init__(self, weights: nn.Parameter, config, share: float) -> None:
        super().__init__()
        self.weights = weights  # (K,), the same Parameter in every slot of one composition
        self.config = config  # the FusionConfig it was made from (temperature: off)
        self.share = share  # 1 / number of slots: the model sums every slot's regulariser
        self.temperature = 1.0

    def forward(self, x: torch.Tensor, loras: list[nn.Module]) -> torch.Tensor:
        """sum_n w_n delta_n(x): (..., in) -> (..., out)."""
        return sum(w * lora(x) for w, lora in zip(self.weights, loras, strict=True))

    def regularization_loss(self) -> torch.Tensor:
        return self.config.l1 * self.weights.abs().sum() * self.share
