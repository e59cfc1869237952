"""Bottleneck adapters at a slot: sequential (Houlsby et al. 2019, ICML; Pfeiffer et al. 2021, EACL), parallel
(He et al. 2022, ICLR) and Compacter (Mahabadi et al. 2021, NeurIPS) are one module with three presets.

    a(x) = s * (act(x D^T + e) U^T + c)     down d -> r, non-linearity, up r -> d, scale s
    z    = h + a(x)                         the slot adds the delta to the sub-layer output h

The input ``x`` is what the kind reads (``AdapterConfig.input``): LayerNorm(h + residual) for the
``pfeiffer`` placement (AdapterHub ``original_ln_before``; h + residual in a pre-LN block), h itself for
``houlsby``, and the residual stream (the sub-layer's input) for ``parallel``. Compacter's D and U are PHM
layers (:class:`~adafuse.fusion.kinds.phm.PHMLinear`): sums of Kronecker products with rule matrices
shared by every site of the adapter. The up-projection starts at exactly zero (Compacter: its right factor),
so a new adapter is the identity: the block computes what the bare backbone computes.

Fusion reads every kind through :meth:`BottleneckAdapter.factors` (D, e, U, c with s folded into U and c), so
the fast path (:mod:`adafuse.fusion.fastpath`) is the same for all three.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from adafuse.fusion.kinds.phm import PHMLinear

PLACEMENTS = {
    # placement: (locations, adapter input is LayerNorm(h + residual))
    "pfeiffer": (("output",), True),
    "houlsby": (("attention", "output"), False),
}
INPUTS = ("normed", "output", "residual")

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class BottleneckAdapter(nn.Module):
    """One adapter at one site: ``down`` (d -> r), activation, ``up`` (r -> d, zero at init), scale."""

    def __init__(self, hidden_size: int, config, shared: dict) -> None:
        super().__init__()
        self.config = config
        size = config.size(hidden_size)
        if config.phm:
            rule = shared.setdefault("phm_rule", _phm_rule(config.phm_dim))
            self.down = PHMLinear(hidden_size, size, rule, where="adapter down-projection")
            self.up = PHMLinear(size, hidden_size, rule, where="adapter up-projection")
            self.down.reset()
            self.up.reset(zero=True)
        else:
            self.down = nn.Linear(hidden_size, size)
            self.up = nn.Linear(size, hidden_size)
            nn.init.normal_(self.down.weight, std=config.init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.scale = config.delta_scale

    @property
    def activation(self):
        return ACTIVATIONS[self.config.non_linearity]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """D (r, d), e (r,), U (d, r) and c (d,) with the scale folded into U and c: a(x) = act(x D^T + e) U^T + c."""
        up_w, up_b = self.up.weight, self.up.bias
        if self.scale != 1.0:
            up_w, up_b = up_w * self.scale, up_b * self.scale
        return self.down.weight, self.down.bias, up_w, up_b

    def bottleneck_activations(self, x: torch.Tensor) -> torch.Tensor:
        """g = act(x D^T + e): (B, L, d) -> (B, L, r)."""
        return self.activation(self.down(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's delta a(x): (B, L, d) -> (B, L, d); the caller adds it to h."""
        delta = self.up(self.bottleneck_activations(x))
        return delta * self.scale if self.scale != 1.0 else delta


def _phm_rule(n: int) -> nn.Parameter:
    """Compacter's n rule matrices (n, n, n), shared by every PHM layer of one adapter (AdapterHub's default
    ``shared_phm_rule``); normal with std 0.01 (AdapterHub draws std 1e-4, which starts the adapter ~100x
    smaller than a bottleneck's init_std)."""
    rule = nn.Parameter(torch.empty(n, n, n))
    nn.init.normal_(rule, std=0.01)
    return rule
