"""The adapter slot: a module that replaces one sub-layer of a frozen block and adds adapters to it.

Several named adapters live in one slot; the active ones add their deltas (``h + sum_n a_n(x)``), or an
active fusion composes its sources (see :mod:`adafuse.fusion.attention`). With nothing active the slot
calls the original module unchanged, so the backbone computes exactly what it computed before.

How the slot reaches the block's residual and norm is the site's ``mode`` (:mod:`adafuse.fusion.sites`);
in a pre-LN block the residual arrives through a :class:`ResidualTap` on the norm before the sub-layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adafuse.fusion import narrow
from adafuse.fusion.attention import fused_activations, stack_adapters
from adafuse.fusion.fastpath import fused_attention
from adafuse.fusion.memo import stamp, unchanged
from adafuse.fusion.sites import SiteSpec


class _Slot(nn.Module):
    """What every slot shares: named adapters and fusions, and which of them run.

    ``active`` (adapter names), ``active_fusion`` ((fusion, its sources)) and ``routes`` ((name, sources, rows)
    per route) say what runs. Setting one also keeps the modules it names, and ``forward`` reads only those:
    compiled code (``torch.compile``) then guards on the modules' kinds and shapes, not on their names, and
    switching from one task's adapter to another's reuses it.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.attention_recorder: list[torch.Tensor] | None = None
        self._active: tuple[str, ...] = ()
        self._active_fusion: tuple[str, tuple[str, ...]] | None = None
        self._routes: list[tuple[str, tuple[str, ...], torch.Tensor]] | None = None
        self._running: tuple[nn.Module, ...] = ()  # the active adapters
        self._fusion_running: tuple[nn.Module, tuple[nn.Module, ...]] | None = None  # (fusion, its sources)
        self._routes_running: list[tuple[nn.Module, tuple[nn.Module, ...], torch.Tensor]] | None = None

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    @active.setter
    def active(self, names: tuple[str, ...]) -> None:
        self._active = tuple(names)
        self._running = tuple(self.adapters[name] for name in self._active)

    @property
    def active_fusion(self) -> tuple[str, tuple[str, ...]] | None:
        return self._active_fusion

    @active_fusion.setter
    def active_fusion(self, fusion: tuple[str, tuple[str, ...]] | None) -> None:
        self._active_fusion = fusion
        self._fusion_running = None if fusion is None else self._resolve(*fusion)

    @property
    def routes(self) -> list[tuple[str, tuple[str, ...], torch.Tensor]] | None:
        return self._routes

    @routes.setter
    def routes(self, routes: list[tuple[str, tuple[str, ...], torch.Tensor]] | None) -> None:
        self._routes = routes
        self._routes_running = None if routes is None else [(*self._resolve(n, s), rows) for n, s, rows in routes]

    def _resolve(self, name: str, sources: tuple[str, ...]) -> tuple[nn.Module, tuple[nn.Module, ...]]:
        """Adapter ``name`` (no sources) or fusion ``name`` with its source adapters."""
        if sources:
            return self.fusions[name], tuple(self.adapters[s] for s in sources)
        return self.adapters[name], ()

    def drop(self, name: str) -> None:
        """Stop running adapter or fusion ``name`` (it is being deleted); a fusion over it stops too."""
        self.active = tuple(a for a in self._active if a != name)
        if self._active_fusion is not None and name in (self._active_fusion[0], *self._active_fusion[1]):
            self.active_fusion = None
        if self._routes is not None:
            self.routes = [r for r in self._routes if name not in (r[0], *r[1])] or None

    @property
    def is_bare(self) -> bool:
        # len(): dynamo traces no `not` of a tuple of modules (a graph break)
        return len(self._running) == 0 and self._fusion_running is None and not self._routes_running

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the running adapters compute in: their weights' (float32 master weights beside a narrower
        backbone)."""
        running = [*self._running, *(module for module, _, _ in self._routes_running or ())]
        if self._fusion_running is not None:
            running.append(self._fusion_running[0])
        for module in running:
            for param in module.parameters():
                return param.dtype
        return torch.float32

    def forget_maps(self) -> None:
        """Drop memoised values made of the weights (only :class:`AdapterSlot` keeps any)."""


class AdapterSlot(_Slot):
    def __init__(self, base: nn.Module, spec: SiteSpec, norm: nn.Module | None = None) -> None:
        super().__init__(base)
        self.mode = spec.mode
        # The block owns its norm (None: the adapter input is h + residual, as AdapterHub has it for pre-LN
        # blocks); a tuple keeps it out of this module's parameters and state dict.
        self._norm = (norm if norm is not None else nn.Identity(),)
        self._residual: torch.Tensor | None = None  # pre_ln: handed over by the ResidualTap, used once
        self._maps_memo: dict[tuple[str, nn.Module], tuple] = {}  # ("sources"|"maps", fusion) -> (key, value)

    @property
    def layer_norm(self) -> nn.Module:
        return self._norm[0]

    def forward(self, *args, **kwargs):
        if self.is_bare:
            return self.base(*args, **kwargs)
        if self.mode == "inner":
            hidden_states, input_tensor = args[0], args[1] if len(args) > 1 else kwargs["input_tensor"]
            h = self.base.dropout(self.base.dense(hidden_states))  # (B, L, d)
            return self.layer_norm(self.mix(h, input_tensor) + input_tensor)
        if self.mode == "pre_ln":
            residual, self._residual = self._residual, None
            if residual is None:
                raise RuntimeError("pre-LN adapter slot ran without its residual (is the ResidualTap in place?)")
        else:
            residual = args[0] if args else next(iter(kwargs.values()))
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.mix(out[0], residual), *out[1:])
        return self.mix(out, residual)

    def _adapter_input(self, mode: str, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """What an adapter reads (``AdapterConfig.input``): norm(h + residual), h, or the residual stream."""
        if mode == "normed":
            return in_dtype(self.layer_norm, h + residual)
        return h if mode == "output" else residual

    def mix(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The slot's output before the block's residual + layer norm: h plus the adapters' contribution, computed
        in the adapters' dtype (float32 beside a bfloat16 backbone) and handed back in the backbone's."""
        dtype = self.adapter_dtype
        if h.dtype == dtype or torch.is_autocast_enabled(h.device.type):  # autocast casts on its own
            return self._mix(h, residual)
        return narrow.recompute_in_backward(self._widened_mix, h, residual, dtype)  # keeps h and residual only

    def _widened_mix(self, h: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._routes_running is not None:  # each route's rows widened, not the whole batch
            return self._routed(h, residual, dtype)
        return self._mix(h.to(dtype), residual.to(dtype)).to(h.dtype)

    def _mix(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self._routes_running is not None:
            return self._routed(h, residual, h.dtype)
        if self._fusion_running is not None:
            return self._fuse(*self._fusion_running, h, residual)
        out = h
        for adapter in self._running:
            out = out + adapter(self._adapter_input(adapter.config.input, h, residual))
        return out

    def _routed(self, h: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each route's rows through its own adapter or fusion, computed in ``dtype`` and written back in h's;
        rows without a route keep h."""
        out = h.clone()
        record = torch.is_grad_enabled()  # a graph keeps every version of out; without one, write in place
        for module, sources, rows in self._routes_running:
            h_rows, residual_rows = h.index_select(0, rows).to(dtype), residual.index_select(0, rows).to(dtype)
            if sources:
                mixed = self._fuse(module, sources, h_rows, residual_rows)
            else:
                mixed = h_rows + module(self._adapter_input(module.config.input, h_rows, residual_rows))
            mixed = mixed.to(h.dtype)
            out = out.index_copy(0, rows, mixed) if record else out.index_copy_(0, rows, mixed)
        return out

    def _fuse(self, fusion: nn.Module, adapters: tuple[nn.Module, ...], h: torch.Tensor, residual: torch.Tensor):
        x = self._adapter_input(adapters[-1].config.input, h, residual)
        source_params = [p for adapter in adapters for p in adapter.parameters()]  # read once: the hot path
        sources_frozen = not any(p.requires_grad for p in source_params)
        fast = not fusion.config.query_before_ln and not fusion.drops_scores and sources_frozen
        # a training step with fewer tokens than the K(r+1) rows of the per-step weight products: per token
        per_token = torch.is_grad_enabled() and x.shape[:-1].numel() < sum(a.down.bias.numel() + 1 for a in adapters)
        if fast and not per_token:  # the common case: one hand-differentiated pass (adafuse.fusion.fastpath)
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            act = adapters[-1].config.non_linearity
            with torch.autocast(device, enabled=False):  # maps in the weights' dtype; FusedAttention casts
                weight, bias, values = self._fusion_maps(fusion, adapters, source_params)
                out, weights = fused_attention(x, weight, bias, values, len(adapters), fusion.temperature, act, dtype)
            out = fusion.add_residual(out, h)
        else:
            query = h if fusion.config.query_before_ln else x
            if sources_frozen:  # stacked once and kept (as the fast path does), K concatenations fewer per step
                down_w, down_b, up = self._memo(("sources", fusion), source_params, lambda: _stacked(adapters))
            else:
                down_w, down_b, up = stack_adapters(adapters)
            g = fused_activations(x, down_w, down_b, len(adapters), adapters[-1].activation)  # (B, L, K, r)
            out, weights = (fusion.forward_per_token if per_token else fusion)(query, g, up, h)
        if self.attention_recorder is not None:
            self.attention_recorder.append(weights.detach())
        return out

    def _fusion_maps(self, fusion: nn.Module, adapters: tuple[nn.Module, ...], source_params: list):
        """[D; M^T], [e; b] and V~ for the fast path, from the weights.

        The stacked (frozen) sources are memoised per slot and fusion, and so are the maps without autograd
        (inference, validation), each until one of the tensors it is made of changes (an optimizer step, a load,
        ``.to()``): the key holds each tensor with its version counter and storage. In training only the maps'
        few products with the fusion's own weights run every step.
        """
        sources = self._memo(("sources", fusion), source_params, lambda: _stacked(adapters))
        if torch.is_grad_enabled():  # the fusion's weights change every step
            self._maps_memo.pop(("maps", fusion), None)
            return _maps(fusion, *sources)
        return self._memo(("maps", fusion), [*fusion.parameters(), *sources], lambda: _maps(fusion, *sources))

    def _memo(self, key: tuple[str, nn.Module], tensors: list[torch.Tensor], make):
        """``make()``, kept under ``key`` while every one of ``tensors`` is unchanged. Compiled code computes it
        every call (the compiler cannot keep Python state between calls; inside one graph it costs a few fused
        kernels)."""
        if torch.compiler.is_compiling():
            return make()
        now = stamp(tensors)
        memo = self._maps_memo.get(key)
        if memo is None or not unchanged(memo[0], now):
            memo = self._maps_memo[key] = (now, make())
        return memo[1]

    def forget_maps(self) -> None:
        """Drop the memoised maps (they hold references to the tensors they were made of)."""
        self._maps_memo.clear()


def _stacked(adapters: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen sources stacked; plain tensors even under inference mode, as training steps reuse them."""
    with torch.inference_mode(False):
        return stack_adapters(adapters)


def _maps(fusion: nn.Module, down_w, down_b, up) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    up_flat = up.reshape(-1, up.shape[-1])  # U~, (K(r+1), d)
    m, bias = fusion.score_map(up_flat)
    return torch.cat([down_w, m.t()]), torch.cat([down_b, bias]), fusion.value_map(up_flat)


class ResidualTap(nn.Module):
    """Replaces the norm before a pre-LN sub-layer; hands the norm's input (the residual stream) to the slot.

    The slot takes the tensor on its next call and drops it, so nothing outlives one forward pass; with the
    slot bare, nothing is handed over at all.
    """

    def __init__(self, base: nn.Module, slot: AdapterSlot) -> None:
        super().__init__()
        self.base = base
        self._slot = (slot,)  # not a submodule: the slot lives at its own site

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        slot = self._slot[0]
        if not slot.is_bare:
            slot._residual = hidden_states
        return self.base(hidden_states, *args, **kwargs)


class ProjectionSlot(_Slot):
    """Replaces one linear projection; the active adapters (LoRA) add their deltas to its output.

    The same attributes as :class:`AdapterSlot` (``adapters``, ``active``, ``routes``, ``fusions``: here weighted
    compositions, :mod:`adafuse.fusion.composition`), so activation, training and state code treat both slots
    alike.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped projection's weight (model code reads its dtype, e.g. T5's feed-forward)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.is_bare:
            return out
        dtype = self.adapter_dtype
        if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return self._deltas(x, out)
        # a narrower backbone: the deltas summed in the adapters' dtype, added to the projection in the backbone's
        return out + narrow.recompute_in_backward(self._widened_deltas, x, dtype)  # keeps x, not its float32 copy

    def _widened_deltas(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        zeros = x.new_zeros((*x.shape[:-1], self.out_features), dtype=dtype)
        return self._deltas(x.to(dtype), zeros).to(x.dtype)

    def _deltas(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self._routes_running is not None:
            for module, sources, rows in self._routes_running:
                out = out.index_add(0, rows, self._delta(module, sources, x.index_select(0, rows)))
            return out
        if self._fusion_running is not None:
            return out + self._delta(*self._fusion_running, x)
        for adapter in self._running:
            out = out + adapter(x)
        return out

    @staticmethod
    def _delta(module: nn.Module, sources: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
        """An adapter's delta, or a composition's over its ``sources``."""
        return module(x, list(sources)) if sources else module(x)


class PrefixSlot(_Slot):
    """Replaces a self-attention module; the active adapters (prefix tuning) prepend keys and values to its own.

    The module reads its keys and values through ``cache.update(k, v, layer)`` (transformers' KV cache); the slot
    passes a :class:`_Prepend` there, which returns ``[prefix; k]`` and ``[prefix; v]``, and widens the attention
    mask by the prefix positions. Several active prefixes are concatenated; with per-row routes each row sees
    only its own adapter's prefix (the others are masked). Same attributes as :class:`AdapterSlot`.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.heads = base.num_attention_heads  # self.fusions stays empty: prefixes are not fused

    def forward(self, hidden_states: torch.Tensor, *args, attention_mask=None, cache=None, **kwargs):
        if self.is_bare:
            return self.base(hidden_states, *args, attention_mask=attention_mask, cache=cache, **kwargs)
        if cache is not None:
            raise RuntimeError("prefix tuning runs without a KV cache (the BERT family's self-attention)")
        batch = hidden_states.shape[0]
        parts = [(adapter(), None) for adapter in self._running]  # (2, P, d), all rows
        for adapter, _, rows in self._routes_running or ():
            seen = torch.zeros(batch, dtype=torch.bool, device=hidden_states.device)
            parts.append((adapter(), seen.index_fill(0, rows, True)))
        prefix = torch.cat([p for p, _ in parts], dim=1)  # (2, P, d)
        key, value = (
            p.view(p.shape[0], self.heads, -1).transpose(0, 1).expand(batch, -1, -1, -1) for p in prefix
        )  # (B, H, P, d/H)
        mask = _prefix_mask(attention_mask, parts, hidden_states, self.base.config._attn_implementation)
        return self.base(hidden_states, *args, attention_mask=mask, cache=_Prepend(key, value), **kwargs)


class _Prepend:
    """A stand-in for transformers' KV cache: ``update`` returns the prefixes followed by the new keys/values."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.key.to(key.dtype), key], dim=2), torch.cat([self.value.to(value.dtype), value], dim=2)


def _prefix_mask(mask: torch.Tensor | None, parts: list, hidden: torch.Tensor, implementation: str):
    """The attention mask widened by the prefix positions (B, 1, L, P + L): a prefix is visible to the rows
    it serves. ``mask`` is None (everything visible), boolean (True: attend) or additive (0: attend)."""
    if mask is None and all(rows is None for _, rows in parts):
        return None
    batch, length = hidden.shape[:2]
    visible = torch.cat(
        [
            (rows if rows is not None else torch.ones(batch, dtype=torch.bool, device=hidden.device))[:, None].expand(
                -1, p.shape[1]
            )
            for p, rows in parts
        ],
        dim=1,
    )  # (B, P)
    if mask is not None and mask.dim() == 2:  # (B, L) padding mask (flash attention): 1 attend
        return torch.cat([visible.to(mask.dtype), mask], dim=-1)
    additive = mask.is_floating_point() if mask is not None else implementation == "eager"
    if mask is None:
        mask = torch.zeros(batch, 1, length, length, dtype=hidden.dtype, device=hidden.device)
        mask = mask if additive else mask == 0
    prefix = visible[:, None, None, :].expand(-1, 1, mask.shape[2], -1)  # (B, 1, L, P)
    if additive:
        prefix = torch.zeros_like(prefix, dtype=mask.dtype).masked_fill(~prefix, torch.finfo(mask.dtype).min)
    return torch.cat([prefix, mask.expand(batch, -1, -1, -1)], dim=-1)


def in_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a backbone module whose weights may be narrower than ``x``: run in theirs, return in x's."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dtype == x.dtype:
        return module(x)
    return module(x.to(weight.dtype)).to(x.dtype)
