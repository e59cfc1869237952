"""The PHM layer of Compacter (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers", NeurIPS, Eq. 3-4): a linear map whose weight is a sum of n Kronecker products,

    H = sum_i  A_i (x) (s_i t_i)         A_i: the shared n x n rule matrices, s_i t_i: rank-1 factors
    y = x H + b                          H: (in, out)

in AdapterHub's layout (``W_left`` (n, in/n, 1), ``W_right`` (n, 1, out/n), ``phm_rule`` (n, n, n)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from adafuse.fusion.errors import UserError


def kronecker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product: (n, p, q) and (n, s, t) -> (n, p s, q t)."""
    n, p, q = a.shape
    _, s, t = b.shape
    return (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(n, p * s, q * t)


class PHMLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rule: nn.Parameter, where: str) -> None:
        super().__init__()
        n = rule.shape[0]
        if in_features % n or out_features % n:
            raise UserError(f"adapter.phm_dim: {n} must divide the {where}'s sizes ({in_features} -> {out_features})")
        self.phm_rule = rule  # the same Parameter in every PHM layer of one adapter
        self.W_left = nn.Parameter(torch.empty(n, in_features // n, 1))
        self.W_right = nn.Parameter(torch.empty(n, 1, out_features // n))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def reset(self, zero: bool = False) -> None:
        """Glorot-uniform factors (AdapterHub's default); ``zero``: the right factor starts at 0 (H = 0)."""
        with torch.no_grad():
            for i in range(self.W_left.shape[0]):
                nn.init.xavier_uniform_(self.W_left[i])
                nn.init.xavier_uniform_(self.W_right[i])
            if zero:
                self.W_right.zero_()
            self.bias.zero_()

    @property
    def weight(self) -> torch.Tensor:
        """H^T, (out, in): the effective weight in nn.Linear's convention."""
        factors = torch.bmm(self.W_left, self.W_right)  # (n, in/n, out/n)
        return kronecker(self.phm_rule, factors).sum(0).t()  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
