"""Classification heads, one per task, AdapterHub-compatible in layout.

``dropout -> dense d->d -> tanh -> dropout -> linear d->labels`` over the first token ([CLS], the default,
as AdapterHub ``ClassificationHead`` with ``use_pooler=False``) or the mask-weighted mean of the tokens.
Being an ``nn.Sequential``, its state-dict keys (``1.weight``, ``4.weight``) are AdapterHub's keys
without the ``heads.<name>.`` prefix.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import UserError

POOLINGS = ("cls", "mean")


class ClassificationHead(nn.Sequential):
    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1) -> None:
        if pooling not in POOLINGS:
            raise UserError(f"head.pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
        if num_labels < 2:
            raise UserError(f"a classification head needs at least 2 labels, got {num_labels}")
        super().__init__(
            nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_labels),
        )
        self.pooling = pooling
        for module in self:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def num_labels(self) -> int:
        return self[4].out_features

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) hidden states and (B, L) mask -> (B, num_labels) logits."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return super().forward(pooled)
