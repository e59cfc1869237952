"""The adapter slot: a module that replaces one sub-layer of a frozen block and adds adapters to it.

Several named adapters live in one slot; the active ones add their deltas (``h + sum_n a_n(x)``), or an
active fusion composes its sources (see :mod:`adafuse.fusion.attention`). With nothing active the slot
calls the original module unchanged, so the backbone computes exactly what it computed before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import down_and_scores, fused_activations, stack_adapters
from .sites import SiteSpec


class AdapterSlot(nn.Module):
    def __init__(self, base: nn.Module, spec: SiteSpec, block_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.base = base
        self.mode = spec.mode
        # The block owns its layer norm; a tuple keeps it out of this module's parameters and state dict.
        self._block_norm = (block_norm,)
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.active_fusion: tuple[str, tuple[str, ...]] | None = None  # (fusion name, source names)
        # Per-row routing (mixed-task batches): (adapter or fusion name, its sources or (), batch row indices).
        self.routes: list[tuple[str, tuple[str, ...], torch.Tensor]] | None = None
        self.attention_recorder: list[torch.Tensor] | None = None

    @property
    def layer_norm(self) -> nn.Module:
        return self.base.LayerNorm if self.mode == "inner" else self._block_norm[0]

    @property
    def is_bare(self) -> bool:
        return not self.active and self.active_fusion is None and not self.routes

    def forward(self, *args, **kwargs):
        if self.is_bare:
            return self.base(*args, **kwargs)
        if self.mode == "inner":
            hidden_states, input_tensor = args[0], args[1] if len(args) > 1 else kwargs["input_tensor"]
            h = self.base.dropout(self.base.dense(hidden_states))  # (B, L, d)
            return self.layer_norm(self.mix(h, input_tensor) + input_tensor)
        residual = args[0] if args else next(iter(kwargs.values()))
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.mix(out[0], residual), *out[1:])
        return self.mix(out, residual)

    def _adapter_input(self, normed: bool, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(h + residual) if normed else h

    def mix(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The slot's output before the block's residual + layer norm: h plus the adapters' contribution."""
        if self.routes:
            return self._routed(h, residual)
        if self.active_fusion is not None:
            name, sources = self.active_fusion
            return self._fuse(name, [self.adapters[s] for s in sources], h, residual)
        out = h
        for name in self.active:
            adapter = self.adapters[name]
            out = out + adapter(self._adapter_input(adapter.config.input_is_normed, h, residual))
        return out

    def _routed(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Each route's rows through its own adapter or fusion; rows without a route keep h."""
        out = h.clone()
        for name, sources, rows in self.routes:
            h_rows, residual_rows = h.index_select(0, rows), residual.index_select(0, rows)
            if sources:
                mixed = self._fuse(name, [self.adapters[s] for s in sources], h_rows, residual_rows)
            else:
                adapter = self.adapters[name]
                mixed = h_rows + adapter(self._adapter_input(adapter.config.input_is_normed, h_rows, residual_rows))
            out = out.index_copy(0, rows, mixed)
        return out

    def _fuse(self, name: str, adapters: list[nn.Module], h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        fusion = self.fusions[name]
        x = self._adapter_input(adapters[-1].config.input_is_normed, h, residual)
        query = h if fusion.config.query_before_ln else x
        down_w, down_b, up = stack_adapters(adapters)
        k = len(adapters)
        if query is x:  # the K down-projections and the score projection x M share one matmul
            m, bias = fusion.score_map(up.reshape(-1, up.shape[-1]))
            both = down_and_scores(x, down_w, down_b, m, bias)
            kr = down_w.shape[0]
            g = adapters[-1].activation(both[..., :kr]).reshape(*x.shape[:-1], k, -1)  # (B, L, K, r)
            out, weights = fusion(query, g, up, h, proj=both[..., kr:])
        else:
            g = fused_activations(x, down_w, down_b, k, adapters[-1].activation)  # (B, L, K, r)
            out, weights = fusion(query, g, up, h)
        if self.attention_recorder is not None:
            self.attention_recorder.append(weights.detach())
        return out
