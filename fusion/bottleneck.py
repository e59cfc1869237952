"""The bottleneck adapter (Houlsby et al. 2019, ICML; Pfeiffer et al. 2021, EACL).

    a(x) = act(x D^T + e) U^T + c          down d -> r, non-linearity, up r -> d
    z    = h + a(x)                        residual: h is the sub-layer output, x the adapter input

``x`` is ``LayerNorm(h + residual)`` for the ``pfeiffer`` placement (AdapterHub ``original_ln_before``)
and ``h`` itself for ``houlsby``. The up-projection starts at exactly zero, so a new adapter is the
identity: the block computes what the bare backbone computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

PLACEMENTS = {
    # placement: (locations, adapter input is LayerNorm(h + residual))
    "pfeiffer": (("output",), True),
    "houlsby": (("attention", "output"), False),
}

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class BottleneckConfig:
    """How an adapter is shaped and where it sits.

    Attributes:
        placement: ``pfeiffer`` (after the feed-forward block) or ``houlsby`` (after attention and feed-forward).
        reduction_factor: bottleneck size r = hidden_size // reduction_factor, unless ``bottleneck`` is given.
        bottleneck: explicit bottleneck size r.
        non_linearity: relu, gelu, swish (silu) or tanh.
        init_std: standard deviation of the down-projection init (the up-projection starts at zero).
        ln_before: adapter input is LayerNorm(h + residual); defaults to the placement's choice.
    """

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    bottleneck: int | None = None
    non_linearity: str = "relu"
    init_std: float = 0.02
    ln_before: bool | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise UserError(f"adapter.placement: '{self.placement}' is not one of {', '.join(PLACEMENTS)}")
        if self.non_linearity not in ACTIVATIONS:
            raise UserError(f"adapter.non_linearity: '{self.non_linearity}' is not one of {', '.join(ACTIVATIONS)}")
        if self.bottleneck is None and self.reduction_factor < 1:
            raise UserError(f"adapter.reduction_factor: {self.reduction_factor} must be >= 1")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise UserError(f"adapter.bottleneck: {self.bottleneck} must be >= 1")

    @property
    def locations(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement][0]

    @property
    def input_is_normed(self) -> bool:
        return PLACEMENTS[self.placement][1] if self.ln_before is None else self.ln_before

    def size(self, hidden_size: int) -> int:
        return self.bottleneck or max(1, hidden_size // self.reduction_factor)


class BottleneckAdapter(nn.Module):
    """One adapter at one site: ``down`` (d -> r), activation, ``up`` (r -> d, zero at init)."""

    def __init__(self, hidden_size: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.config = config
        size = config.size(hidden_size)
        self.down = nn.Linear(hidden_size, size)
        self.up = nn.Linear(size, hidden_size)
        nn.init.normal_(self.down.weight, std=config.init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def activation(self):
        return ACTIVATIONS[self.config.non_linearity]

    def bottleneck_activations(self, x: torch.Tensor) -> torch.Tensor:
        """g = act(x D^T + e): (B, L, d) -> (B, L, r)."""
        return self.activation(self.down(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's delta a(x): (B, L, d) -> (B, L, d); the caller adds the residual."""
        return self.up(self.bottleneck_activations(x))
