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
formed. With dropout on the scores
(AdapterHub's ``BertFusion``) the common terms no longer cancel and are added back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FusionConfig:
    """Options of the fusion layer; the defaults are AdapterHub's ``dynamic`` config.

    Attributes:
        query, key, value: learn W_Q, W_K, W_V (else the identity).
        query_before_ln: the query is the sub-layer output before the layer norm.
        residual_before: values are h + a_n (AdapterHub ``static``-style) instead of a_n, h added after.
        value_initialized: W_V starts at the identity (+ noise of std ``value_init_noise``).
        regularization: add ``reg_lambda`` * ||I - W_V||^2 to the loss.
        temperature: anneal the softmax temperature from ``temperature_start`` to 1.
        dropout: dropout probability on the raw scores (0 disables it).
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

    def score_map(self, up_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """M = W_Q^T (W_K U~^T) and b_Q (W_K U~^T), both over K(r+1) columns, formed once per step."""
        m = up_flat.t()  # (d, K(r+1))
        if self.key is not None:
            m = self.key.weight @ m
        bias = self.query.bias @ m if self.query is not None else None  # (K(r+1),)
        if self.query is not None:
            m = self.query.weight.t() @ m
        return m, bias

    def forward(
        self,
        x: torch.Tensor,
        g: torch.Tensor,
        up: torch.Tensor,
        residual: torch.Tensor,
        proj: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse K adapters.

        Args:
            x: query input, (B, L, d).
            g: bottleneck activations of the K adapters, (B, L, K, r).
            up: augmented up-projections U~ = [U_n^T; c_n], (K, r+1, d).
            residual: h, (B, L, d).
            proj: x M + b if the caller already computed it (see ``AdapterSlot._fuse``), (B*L, K(r+1)).

        Returns:
            The fused output o, (B, L, d), and the attention weights s, (B, L, K).
        """
        bsz, length, k, r = g.shape
        d = x.shape[-1]
        up_flat = up.reshape(k * (r + 1), d)  # U~, (K(r+1), d)

        if proj is None:
            m, bias = self.score_map(up_flat)
            flat = x.reshape(-1, d)  # (B*L, d)
            proj = torch.addmm(bias, flat, m) if bias is not None else flat @ m  # (B*L, K(r+1))
        proj = proj.reshape(bsz, length, k, r + 1)
        scores = (proj[..., :r] * g).sum(-1) + proj[..., r]  # (B, L, K): the g~_n = [g_n, 1] product, unrolled

        if self.training and self.config.dropout > 0:
            scores = self.score_dropout(scores + self._common_score(x, residual))
        weights = torch.softmax(scores / self.temperature, dim=-1)  # (B, L, K)

        # Values: sum_n s_n a_n W_V^T = [s_n g~_n] (U~ W_V^T): W_V folds into the K(r+1) x d up-projections.
        values = up_flat if self.value is None else up_flat @ self.value.weight.t()  # (K(r+1), d)
        values = values.view(k, r + 1, d)
        mixed = (weights.unsqueeze(-1) * g).reshape(bsz, length, k * r)  # (B, L, K r)
        out = mixed @ values[:, :r].reshape(k * r, d) + weights @ values[:, r]  # (B, L, d)
        if self.config.residual_before:  # o = (h + sum_n s_n a_n) W_V^T
            return out + (self.value(residual) if self.value is not None else residual), weights
        return out + residual, weights

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
    down_w = torch.cat([ad.down.weight for ad in adapters])  # (K r, d)
    down_b = torch.cat([ad.down.bias for ad in adapters])  # (K r,)
    up = torch.stack([torch.cat([ad.up.weight.t(), ad.up.bias.unsqueeze(0)]) for ad in adapters])  # (K, r+1, d)
    return down_w, down_b, up


def fused_activations(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, k: int, act) -> torch.Tensor:
    """g for all K adapters with one matmul: (B, L, d) -> (B, L, K, r)."""
    g = act(F.linear(x, down_w, down_b))  # (B, L, K r)
    return g.view(*x.shape[:-1], k, -1)


class _FrozenDownAndScores(torch.autograd.Function):
    """``x [D; M^T]^T + [e; b]`` in one matmul, where D (the K frozen down-projections) gets no gradient.

    Autograd on a concatenated weight would compute the weight gradient for all K r + K(r+1) rows and
    discard the frozen K r of them; this computes it for the M rows only (at K = 16 that halves the
    largest matmul of the fusion's backward pass).
    """

    @staticmethod
    def forward(ctx, x, down_w, down_b, m_t, bias):
        weight = torch.cat([down_w, m_t])  # (K r + K(r+1), d)
        flat = x.reshape(-1, x.shape[-1])  # (B*L, d)
        out = torch.addmm(torch.cat([down_b, bias]), flat, weight.t())
        ctx.save_for_backward(flat, weight)
        ctx.rows = down_w.shape[0]
        ctx.input_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        flat, weight = ctx.saved_tensors
        grad = grad.reshape(-1, weight.shape[0])
        grad_x = (grad @ weight).view(ctx.input_shape) if ctx.needs_input_grad[0] else None
        scores = grad[:, ctx.rows :]
        grad_m = scores.t() @ flat if ctx.needs_input_grad[3] else None
        grad_bias = scores.sum(0) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_m, grad_bias


def down_and_scores(x, down_w, down_b, m, bias):
    """(B, L, d) -> (B, L, K r + K(r+1)): the K frozen down-projections and the scores' x M + b, one matmul."""
    if bias is None:
        bias = m.new_zeros(m.shape[1])
    if down_w.requires_grad or down_b.requires_grad:  # adapters being trained: plain autograd
        return F.linear(x, torch.cat([down_w, m.t()]), torch.cat([down_b, bias]))
    return _FrozenDownAndScores.apply(x, down_w, down_b, m.t(), bias)
