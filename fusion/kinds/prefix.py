"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL, §4.3):
every self-attention layer attends to P extra key/value positions before the sequence's own,

    head_i = Attention(x W_q, [P_k^(l); x W_k], [P_v^(l); x W_v])

and the prefixes of all layers come from one reparametrisation MLP shared by the adapter's layers
(AdapterHub's ``PrefixTuning``, ``flat=False``):

    [P_k^(1); P_v^(1); ...; P_k^(n); P_v^(n)] = W_2 act(W_1 E + b_1) + b_2     E: (P, d) embeddings

One :class:`Prefix` module per layer, inside a :class:`~adafuse.fusion.slot.PrefixSlot`; each holds the same
``wte`` and ``control_trans`` modules (AdapterHub's names) and its position among the adapter's layers. A
layer computes only its own rows of W_2 (its 2d of the n * 2d outputs), so nothing is computed twice. Without
autograd (inference, validation) the prefixes are folded: computed once from the weights and reused by every
forward pass until a weight changes, so a trained prefix costs its P extra key/value positions and nothing
else. Prefix tuning is not the identity at init (the method defines none): the prefixes shift attention from
the first step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adafuse.fusion.kinds.bottleneck import ACTIVATIONS
from adafuse.fusion.memo import stamp, unchanged


class Prefix(nn.Module):
    """The key and value prefixes of one layer: ``forward()`` -> (2, P, d), keys then values."""

    def __init__(self, hidden_size: int, config, shared: dict, position: int, layers: int) -> None:
        super().__init__()
        if "wte" not in shared:
            size = config.size(hidden_size)
            shared["wte"] = nn.Embedding(config.prefix_length, hidden_size)
            shared["control_trans"] = nn.Sequential(
                nn.Linear(hidden_size, size),
                _Activation(config.non_linearity),
                nn.Linear(size, layers * 2 * hidden_size),
            )
        self.wte, self.control_trans = shared["wte"], shared["control_trans"]  # the same modules in every layer
        self.config = config
        self.rows = slice(position * 2 * hidden_size, (position + 1) * 2 * hidden_size)  # this layer's outputs
        self.dropout = nn.Dropout(config.dropout)
        self._folded: tuple[list, torch.Tensor] | None = None  # (weights' stamp, prefixes) for inference

    def forward(self) -> torch.Tensor:
        """(2, P, d): this layer's key and value prefixes (AdapterHub's layout of ``control_trans``'s outputs)."""
        if torch.is_grad_enabled():
            self._folded = None
            return self.dropout(self._compute())
        now = stamp(self.parameters())
        if self._folded is None or not unchanged(self._folded[0], now):
            with torch.inference_mode(False):
                self._folded = (now, self._compute())
        return self._folded[1]

    def _compute(self) -> torch.Tensor:
        down, act, up = self.control_trans
        hidden = act(down(self.wte.weight))  # (P, r)
        out = nn.functional.linear(hidden, up.weight[self.rows], up.bias[self.rows])  # (P, 2d)
        return out.view(out.shape[0], 2, -1).transpose(0, 1)  # (2, P, d)


class _Activation(nn.Module):
    """A named non-linearity as a module (the middle entry of ``control_trans``, as AdapterHub has it)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)
