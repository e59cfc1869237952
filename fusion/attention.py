"""AdapterFusion attention (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning", EACL, Sec. 3.2, Eq. 2-5), computed exactly in a batched, re-associated form.

Per layer, with x the query input, h the residual and a_n = g_n U_n^T + c_n the n-th frozen adapter's
delta (g_n = act(x D_n^T + e_n), r values per token):

    v_n = a_n            (or h + a_n with ``residual_before``)
    q   = x W_Q^T + b_Q,   k_n = v_n W_K^T + b_K
    s   = softmax_n(q . k_n / T)                       (Eq. 3)
    o   = sum_n s_n (v_n W_V^T)  (+ h unless ``residual_before``)   (Eq. 4-5)

Re-association (see shared DESIGN.md): q . k_n = p . v_n + q . b_K with p = q W_K = x A + b_Q W_K,
A = W_Q^T W_K. Terms equal for every n (q . b_K, p . h) cancel in the softmax, so with the augmented
factors g~_n = [g_n, 1] and U~_n = [U_n^T; c_n] (r+1 rows):

    score_n = (x M + b_Q W_K U~^T)_n . g~_n,   M = W_Q^T (W_K U~^T)   (one (B*L, d) x (d, K(r+1)) matmul)
    sum_n s_n a_n W_V^T = [s_1 g~_1 ... s_K g~_K] (U~ W_V^T)         (one (B*L, K(r+1)) x (K(r+1), d) matmul)

M and U~ W_V^T depend on the weights only and cost O(d^2 K r) once per step, not per token: for
K(r+1) < d the whole layer costs less per token than one d x d projection. No (B, L, K, d) tensor is
formed. With dropout on the scores (AdapterHub's ``BertFusion``) the common terms no longer cancel and
are added back exactly.

``FusionLayer.forward`` computes this with autograd in every mode; in the common one (query = adapter
input, no score dropout, frozen sources; under autocast too) the slot runs the per-token part through
:class:`adafuse.fusion.fastpath.FusedAttention` instead, the same equations with a hand-written backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adafuse.fusion.errors import UserError

COMPOSITIONS = {"attention": "slot", "weighted": "projection"}  # composition -> where its sources act


@dataclass
class FusionConfig:
    """Options of the fusion layer; the defaults are AdapterHub's ``dynamic`` config.

    Attributes:
        query, key, value: learn W_Q, W_K, W_V (else the identity).
        query_before_ln: the query is the sub-layer output before the layer norm.
        residual_before: values are h + a_n (AdapterHub ``static``-style) instead of a_n, h added after.
        value_initialized: W_V starts at the identity (+ noise of std ``value_init_noise``).
        value_init_noise: standard deviation of the noise added to the identity W_V starts at.
        regularization: add ``reg_lambda`` * ||I - W_V||^2 to the loss.
        reg_lambda: weight of the W_V regulariser.
        temperature: anneal the softmax temperature from ``temperature_start`` to 1.
        temperature_start: the temperature the annealing starts at (>= 1).
        dropout: dropout probability on the raw scores (0 disables it).
        composition: ``attention`` (AdapterFusion over slot kinds) or ``weighted`` (LoraHub: one learned weight
            per LoRA source, :mod:`adafuse.fusion.composition`).
        l1: weighted: the L1 penalty on the weights.
        search: weighted: learn the weights by ``gradient`` (with the head) or by ``es``, a derivative-free
            evolution strategy on the training loss (the head refit for each candidate), as LoraHub does.
        skip_layers: AdapterDrop in training: no fusion layer in the lowest N blocks (nor where a source has
            no module), so the backward pass stops above them.
    """

    query: bool = True
    key: bool = True
    value: bool = True
    query_before_ln: bool = False
    residual_before: bool = False
    value_initialized: bool = True
    value_init_noise: float = 1e-6
    regularization: bool = True
    reg_lambda: float = 0.01
    temperature: bool = False
    temperature_start: float = 50.0
    dropout: float = 0.0
    composition: str = "attention"
    l1: float = 0.05
    search: str = "gradient"
    skip_layers: int = 0

    def __post_init__(self) -> None:
        if self.skip_layers < 0:
            raise UserError(f"fusion.skip_layers: {self.skip_layers} must be >= 0")
        if self.composition not in COMPOSITIONS:
            raise UserError(f"fusion.composition: '{self.composition}' is not one of {', '.join(COMPOSITIONS)}")
        if self.search not in ("gradient", "es"):
            raise UserError(f"fusion.search: '{self.search}' is not one of gradient, es")


class FusionLayer(nn.Module):
    """One AdapterFusion attention layer over K adapters at one site."""

    def __init__(self, hidden_size: int, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d = hidden_size
        self.query = nn.Linear(d, d) if config.query else None
        self.key = nn.Linear(d, d) if config.key else None
        self.value = nn.Linear(d, d, bias=False) if config.value else None
        for linear in (self.query, self.key):
            if linear is not None:
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        if self.value is not None:
            with torch.no_grad():
                if config.value_initialized:
                    self.value.weight.normal_(std=config.value_init_noise)
                    self.value.weight.add_(torch.eye(d))
                else:
                    self.value.weight.normal_(std=0.02)
        self.score_dropout = nn.Dropout(config.dropout)
        # Set between steps by the training loop (see continual.module); never changed by forward().
        self.temperature = config.temperature_start if config.temperature else 1.0

    def score_map(self, up_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M = W_Q^T (W_K U~^T) and b_Q (W_K U~^T), both over K(r+1) columns, formed once per step."""
        m = up_flat.t()  # (d, K(r+1))
        if self.key is not None:
            m = self.key.weight @ m
        bias = self.query.bias @ m if self.query is not None else m.new_zeros(m.shape[1])  # (K(r+1),)
        if self.query is not None:
            m = self.query.weight.t() @ m
        return m, bias

    def value_map(self, up_flat: torch.Tensor) -> torch.Tensor:
        """V~ = U~ W_V^T: the value projection folded into the K(r+1) up-projection rows, (K(r+1), d)."""
        return up_flat if self.value is None else up_flat @ self.value.weight.t()

    @property
    def drops_scores(self) -> bool:
        """Dropout acts on the raw scores in this mode, so the terms common to all adapters must be kept."""
        return self.training and self.config.dropout > 0

    def add_residual(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """o = sum_n s_n a_n W_V^T + h, or (h + sum_n s_n a_n) W_V^T with ``residual_before``."""
        if self.config.residual_before:
            return out + (self.value(residual) if self.value is not None else residual)
        return out + residual

    def forward(
        self, x: torch.Tensor, g: torch.Tensor, up: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse K adapters with autograd throughout (every mode; the slot's fast path covers the common one).

        Args:
            x: query input, (B, L, d).
            g: bottleneck activations of the K adapters, (B, L, K, r).
            up: augmented up-projections U~ = [U_n^T; c_n], (K, r+1, d).
            residual: h, (B, L, d).

        Returns:
            The fused output o, (B, L, d), and the attention weights s, (B, L, K).
        """
        bsz, length, k, r = g.shape
        d = x.shape[-1]
        up_flat = up.reshape(k * (r + 1), d)  # U~, (K(r+1), d)
        m, bias = self.score_map(up_flat)
        proj = F.linear(x, m.t(), bias).view(bsz, length, k, r + 1)  # (B, L, K, r+1)
        scores = (proj[..., :r] * g).sum(-1) + proj[..., r]  # (B, L, K): the g~_n = [g_n, 1] product, unrolled
        if self.drops_scores:
            scores = self.score_dropout(scores + self._common_score(x, residual))
        weights = torch.softmax(scores / self.temperature, dim=-1)  # (B, L, K)

        # Values: sum_n s_n a_n W_V^T = [s_n g~_n] (U~ W_V^T): W_V folds into the K(r+1) x d up-projections.
        values = self.value_map(up_flat).view(k, r + 1, d)
        mixed = (weights.unsqueeze(-1) * g).reshape(bsz, length, k * r)  # (B, L, K r)
        out = mixed @ values[:, :r].reshape(k * r, d) + weights @ values[:, r]  # (B, L, d)
        return self.add_residual(out, residual), weights

    def forward_per_token(
        self, x: torch.Tensor, g: torch.Tensor, up: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same fusion associated per token, for steps with few tokens (arguments as :meth:`forward`).

        p = q W_K, score_n = p . a_n = (U~_n p) . g~_n, o = ([s_1 g~_1 ... s_K g~_K] U~) W_V^T, where
        a_n = g~_n U~_n is never formed: about 3 d^2 + 2 K(r+1) d multiply-adds per token and no per-step weight
        products, where :meth:`forward` spends 3 d^2 K(r+1) per step on M and V~ and 2 K(r+1) d per token. Below
        N = K(r+1) tokens a step this form is cheaper.
        """
        q = self.query(x) if self.query is not None else x  # (B, L, d)
        p = q @ self.key.weight if self.key is not None else q  # (B, L, d): q . k_n = p . a_n + q . b_K
        g_tilde = torch.cat([g, torch.ones_like(g[..., :1])], -1)  # (B, L, K, r+1)
        up_flat = up.reshape(-1, up.shape[-1])  # (K(r+1), d)
        # score_n = p . a_n = (U~_n p) . g~_n; no a_n (B, L, K, d) is formed, nor a copy of U~ per token
        scores = ((p @ up_flat.t()).view(g_tilde.shape) * g_tilde).sum(-1)  # (B, L, K)
        if self.drops_scores:
            scores = self.score_dropout(scores + self._common_score(x, residual))
        weights = torch.softmax(scores / self.temperature, dim=-1)  # (B, L, K)
        mixed = (weights.unsqueeze(-1) * g_tilde).flatten(-2) @ up_flat  # (B, L, d): sum_n s_n g~_n U~_n
        out = self.value(mixed) if self.value is not None else mixed
        return self.add_residual(out, residual), weights

    def _common_score(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """q . b_K (+ p . h with ``residual_before``): equal for every adapter, (B, L, 1)."""
        q = self.query(x) if self.query is not None else x  # (B, L, d)
        common = torch.zeros_like(x[..., :1])
        if self.key is not None:
            common = common + (q @ self.key.bias).unsqueeze(-1)
        if self.config.residual_before:
            p = q @ self.key.weight if self.key is not None else q
            common = common + (p * residual).sum(-1, keepdim=True)
        return common

    def regularization_loss(self) -> torch.Tensor:
        """reg_lambda * ||I - W_V||^2 (Pfeiffer et al. 2021, Sec. 3.2); zero when disabled."""
        if self.value is None or not self.config.regularization:
            return torch.zeros(())
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return self.config.reg_lambda * (eye - self.value.weight).pow(2).sum()


def stack_adapters(adapters: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate K adapters for one batched pass.

    Returns:
        down weight (K*r, d), down bias (K*r,), augmented up U~ (K, r+1, d).
    """
    factors = [ad.factors() for ad in adapters]  # (D, e, U, c) of every kind, the scale folded into U and c
    down_w = torch.cat([d for d, _, _, _ in factors])  # (K r, d)
    down_b = torch.cat([e for _, e, _, _ in factors])  # (K r,)
    up = torch.stack([torch.cat([u.t(), c.unsqueeze(0)]) for _, _, u, c in factors])  # (K, r+1, d)
    return down_w, down_b, up


def fused_activations(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, k: int, act) -> torch.Tensor:
    """g for all K adapters with one matmul: (B, L, d) -> (B, L, K, r)."""
    g = act(F.linear(x, down_w, down_b))  # (B, L, K r)
    return g.view(*x.shape[:-1], k, -1)
