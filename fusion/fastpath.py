"""The per-token part of AdapterFusion as one autograd Function with a hand-written backward.

:mod:`adafuse.fusion.attention` derives the re-associated form; per token (N = B*L rows) it is

    z     = x [D; M^T]^T + [e; b]                 one (N, d) x (d, K r + K(r+1)) matmul
    g_n   = act(z_pre,n),  p~_n = z_score,n        (N, K, r) and (N, K, r+1)
    s     = softmax_n((p~_n[:r] . g_n + p~_n[r]) / T)
    o     = [s_1 g~_1 ... s_K g~_K] V~             one (N, K(r+1)) x (K(r+1), d) matmul, V~ = U~ W_V^T

with D, e the K frozen down-projections, M, b the score map and V~ the value map (both formed once per
step from the weights, so autograd handles them). Autograd over these few lines would save g, the
products and the softmax separately and fill zero tensors for every slice's gradient; here only z and s
are saved (g is recomputed from z), the bias column rides in the matmuls, and the backward writes each
gradient once into one (N, K r + K(r+1)) buffer that feeds two matmuls: grad x and grad M.
"""

from __future__ import annotations

import torch

from adafuse.fusion.kinds.bottleneck import ACTIVATIONS

# d act / dz applied to an incoming gradient, for the non-linearities of adafuse.fusion.kinds.bottleneck.
_DERIVATIVES = {
    "gelu": lambda grad, z: torch.ops.aten.gelu_backward(grad, z),
    "swish": lambda grad, z: torch.ops.aten.silu_backward(grad, z),
    "silu": lambda grad, z: torch.ops.aten.silu_backward(grad, z),
    "tanh": lambda grad, z: torch.ops.aten.tanh_backward(grad, torch.tanh(z)),
}


def _activation_backward(act: str, grad: torch.Tensor, z: torch.Tensor) -> None:
    """grad <- grad * act'(z), in place."""
    if act == "relu":  # one pass, written where it is read
        torch.ops.aten.threshold_backward.grad_input(grad, z, 0.0, grad_input=grad)
    else:
        grad.copy_(_DERIVATIVES[act](grad, z))


def _mix(g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[s_n g_n, s_n] for every adapter: (N, K, r), (N, K) -> (N, K(r+1))."""
    n, k, r = g.shape
    if torch.compiler.is_compiling():  # no out= into a slice there; the compiler fuses product and concatenation
        return torch.cat([g * weights.unsqueeze(-1), weights.unsqueeze(-1)], dim=-1).view(n, k * (r + 1))
    mixed = g.new_empty(n, k, r + 1)
    torch.mul(g, weights.unsqueeze(-1), out=mixed[..., :r])
    mixed[..., r] = weights
    return mixed.view(n, k * (r + 1))


def fused_attention(x, weight, bias, values, k: int, temperature: float, act: str, dtype=None):
    """:class:`FusedAttention`: o (B, L, d) and s (B, L, K). In compiled code its forward as plain differentiable
    operations: the compiler derives the backward and fuses both (the hand-written backward writes into slices
    of one buffer, which dynamo does not trace)."""
    if torch.compiler.is_compiling():
        out, weights, _ = _forward(x, weight, bias, values, k, temperature, act, dtype)
        return out.view(x.shape), weights.view(*x.shape[:-1], k)
    return FusedAttention.apply(x, weight, bias, values, k, temperature, act, dtype)


def _forward(x, weight, bias, values, k: int, temperature: float, act: str, dtype):
    """The forward pass over the N = B*L rows; also returns what the backward reads: the flat input, z and the
    two dtypes."""
    mm = dtype or x.dtype
    acc = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(-1, x.shape[-1]).to(mm)  # (N, d)
    z = torch.addmm(bias.to(mm), flat, weight.to(mm).t())  # (N, K r + K(r+1))
    rows = weight.shape[0] - values.shape[0]  # K r
    n, r = flat.shape[0], rows // k
    g = ACTIVATIONS[act](z[:, :rows].to(acc)).reshape(n, k, r)  # (N, K, r)
    proj = z[:, rows:].to(acc).view(n, k, r + 1)  # (N, K, r+1)
    scores = torch.linalg.vecdot(proj[..., :r], g) + proj[..., r]  # (N, K)
    weights = torch.softmax(scores / temperature, dim=-1)  # (N, K)
    out = _mix(g, weights).to(mm) @ values.to(mm)  # (N, d)
    return out, weights, (flat, z, mm, acc)  # (N, d), (N, K)


class FusedAttention(torch.autograd.Function):
    """o = mix(softmax(scores(x))) V~ for K frozen adapters; gradients for x, M, b and V~ only.

    ``dtype`` is the matmul dtype under autocast (bf16 or fp16; None: the inputs' own). The two matmuls of
    each pass run in it; the activations, the score sums, the softmax and every gradient sum between the
    matmuls run in ``acc`` = at least float32, and each gradient comes back in its input's dtype. The caller
    turns autocast off around :meth:`apply`: the casts here are all explicit, so the float32 and float64 paths
    are the plain ones (every ``.to`` a no-op).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, k: int, temperature: float, act: str, dtype=None):
        """x (B, L, d); weight [D; M^T] (K r + K(r+1), d); bias (same rows); values V~ (K(r+1), d).

        Returns o (B, L, d) without the residual (in the matmul dtype), and the attention weights s (B, L, K).
        """
        out, weights, (flat, z, mm, acc) = _forward(x, weight, bias, values, k, temperature, act, dtype)
        ctx.save_for_backward(flat, weight, values, z, weights)
        ctx.shape, ctx.k, ctx.temperature, ctx.act = x.shape, k, temperature, act
        ctx.x_dtype, ctx.mm, ctx.acc = x.dtype, mm, acc
        ctx.mark_non_differentiable(weights)
        return out.view(x.shape), weights.view(*x.shape[:-1], k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_weights):
        flat, weight, values, z, weights = ctx.saved_tensors
        with torch.autocast(flat.device.type, enabled=False):
            return FusedAttention._backward(ctx, grad_out, flat, weight, values, z, weights)

    @staticmethod
    def _backward(ctx, grad_out, flat, weight, values, z, weights):
        k, n, mm, acc = ctx.k, flat.shape[0], ctx.mm, ctx.acc
        rows = weight.shape[0] - values.shape[0]
        r = rows // k
        go = grad_out.reshape(n, -1).to(mm)  # (N, d)
        g = ACTIVATIONS[ctx.act](z[:, :rows].to(acc)).reshape(n, k, r)  # recomputed, (N, K, r)
        proj = z[:, rows:].to(acc).view(n, k, r + 1)

        grad_values = None
        if ctx.needs_input_grad[3]:  # (K(r+1), d)
            grad_values = (_mix(g, weights).to(mm).t() @ go).to(values.dtype)
        grad_mixed = (go @ values.to(mm).t()).to(acc).view(n, k, r + 1)  # (N, K, r+1)
        grad_s = torch.linalg.vecdot(grad_mixed[..., :r], g) + grad_mixed[..., r]  # (N, K)
        grad_scores = weights * (grad_s - (grad_s * weights).sum(-1, keepdim=True))
        grad_scores /= ctx.temperature  # (N, K)

        grad_z = z.new_empty(z.shape, dtype=acc)  # (N, K r + K(r+1)): [grad of the pre-activations, of x M + b]
        grad_pre = grad_z[:, :rows].view(n, k, r)
        grad_proj = grad_z[:, rows:].view(n, k, r + 1)
        torch.mul(g, grad_scores.unsqueeze(-1), out=grad_proj[..., :r])
        grad_proj[..., r] = grad_scores
        torch.mul(grad_mixed[..., :r], weights.unsqueeze(-1), out=grad_pre)  # through s_n g_n
        grad_pre.addcmul_(proj[..., :r], grad_scores.unsqueeze(-1))  # through the scores
        _activation_backward(ctx.act, grad_pre, z[:, :rows].to(acc).view(n, k, r))

        grad_x = grad_weight = grad_bias = None
        grad_z_mm = grad_z.to(mm)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_z_mm @ weight.to(mm)).view(ctx.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # the frozen D rows get zeros; only the M rows are computed
            grad_weight = weight.new_zeros(weight.shape)
            grad_weight[rows:] = grad_z_mm[:, rows:].t() @ flat
        if ctx.needs_input_grad[2]:
            grad_bias = weight.new_zeros(weight.shape[0])
            grad_bias[rows:] = grad_z[:, rows:].sum(dim=0)
        return grad_x, grad_weight, grad_bias, grad_values, None, None, None, None
