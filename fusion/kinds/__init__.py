"""Adapter kinds behind one protocol: a config, a module per site built from it, identity at init where the
method defines it, and where the kind acts.

``adapter.kind`` picks a row of :data:`KINDS`:

* ``bottleneck`` — sequential bottleneck (Houlsby et al. 2019; Pfeiffer et al. 2021), ``pfeiffer`` or
  ``houlsby`` placement; acts at a slot (a per-site delta that fusion can attend over).
* ``parallel`` — scaled bottleneck beside the sub-layer (He et al. 2022), reading the sub-layer's input
  (the residual stream) instead of its output; acts at a slot.
* ``compacter`` — a bottleneck whose projections are PHM layers sharing their rule matrices across the
  model (Mahabadi et al. 2021); acts at a slot.
* ``lora`` — low-rank weight deltas inside chosen projections (Hu et al. 2022); acts inside a projection
  (a :class:`~adafuse.fusion.slot.ProjectionSlot`), can be merged into the weight, is not fused by attention.
* ``prefix`` — per-layer key/value prefixes from a shared reparametrisation MLP (Li & Liang 2021); acts
  inside self-attention (a :class:`~adafuse.fusion.slot.PrefixSlot`), folded to plain prefixes for inference,
  neither fused nor merged.

Every kind's module lives in a slot's ``adapters`` ModuleDict under the adapter's name, and its state-dict
keys carry no adapter name (``<block>.<site>.down.weight``, ``<block>.q.lora_A``,
``<block>.prefix.wte.weight``), so the slot, library, monitor, fusion and predict code handle every kind alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds.bottleneck import ACTIVATIONS, INPUTS, PLACEMENTS, BottleneckAdapter
from adafuse.fusion.kinds.lora import LoRA
from adafuse.fusion.kinds.prefix import Prefix


@dataclass(frozen=True)
class Kind:
    acts: str  # "slot" (a per-site delta fusion attends over), "projection" (a weight delta) or "prefix"
    non_linearity: str = "relu"  # default non-linearity (bottleneck or reparametrisation MLP)
    scaling: float = 1.0  # default scale of a slot kind's delta
    reads_residual: bool = False  # a slot kind's input is the residual stream (beside the sub-layer)
    phm: bool = False  # down/up are PHM layers (Compacter)
    identity_at_init: bool = True  # a new adapter computes the bare backbone (prefix tuning defines no identity)


KINDS: dict[str, Kind] = {
    "bottleneck": Kind("slot"),
    "parallel": Kind("slot", scaling=4.0, reads_residual=True),
    "compacter": Kind("slot", phm=True),
    "lora": Kind("projection"),
    "prefix": Kind("prefix", non_linearity="tanh", identity_at_init=False),
}
PROJECTIONS = ("q", "k", "v", "ffn_in", "ffn_out")  # LoRA targets, named per architecture in the sites table


@dataclass
class AdapterConfig:
    """What kind of adapter, how it is shaped and where it sits.

    Attributes:
        kind: bottleneck, parallel, compacter, lora or prefix (see :data:`KINDS`).
        placement: slot kinds: ``pfeiffer`` (after the feed-forward block) or ``houlsby`` (after attention and
            feed-forward).
        reduction_factor: bottleneck size r = hidden_size // reduction_factor, unless ``bottleneck`` is given
            (prefix: the width of the reparametrisation MLP).
        bottleneck: explicit bottleneck size r.
        non_linearity: relu, gelu, swish (silu) or tanh; default tanh for prefix, relu for the others.
        init_std: standard deviation of the down-projection init (the up-projection starts at zero).
        ln_before: bottleneck/compacter input is LayerNorm(h + residual); defaults to the placement's choice.
        scaling: multiplies a slot kind's delta; default 4.0 for parallel (He et al. 2022), else 1.0.
        phm_dim: compacter: number n of Kronecker summands (divides d and r).
        r: lora rank.
        alpha: lora scale numerator (delta = alpha / r * B A x).
        target_modules: lora: projections that get a delta (q, k, v, ffn_in, ffn_out).
        dropout: lora: dropout on the delta's input; prefix: on the prefixes (while training).
        prefix_length: prefix: number P of key/value positions each layer prepends.
        skip_layers: AdapterDrop in training (Rücklé et al. 2021): no module in the lowest N blocks, so those
            blocks run as the bare backbone and the backward pass stops above them (AdapterHub's ``leave_out``
            of layers 0..N-1).
    """

    kind: str = "bottleneck"
    placement: str = "pfeiffer"
    reduction_factor: int = 16
    bottleneck: int | None = None
    non_linearity: str | None = None
    init_std: float = 0.02
    ln_before: bool | None = None
    scaling: float | None = None
    phm_dim: int = 4
    r: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.0
    prefix_length: int = 30
    skip_layers: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"adapter.kind: '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.non_linearity is None:
            self.non_linearity = KINDS[self.kind].non_linearity
        if self.placement not in PLACEMENTS:
            raise UserError(f"adapter.placement: '{self.placement}' is not one of {', '.join(PLACEMENTS)}")
        if self.non_linearity not in ACTIVATIONS:
            raise UserError(f"adapter.non_linearity: '{self.non_linearity}' is not one of {', '.join(ACTIVATIONS)}")
        for key in ("reduction_factor", "phm_dim", "r", "prefix_length"):
            if getattr(self, key) < 1:
                raise UserError(f"adapter.{key}: {getattr(self, key)} must be >= 1")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise UserError(f"adapter.bottleneck: {self.bottleneck} must be >= 1")
        unknown = [m for m in self.target_modules if m not in PROJECTIONS]
        if self.acts == "projection" and (unknown or not self.target_modules):
            raise UserError(f"adapter.target_modules: {unknown or '[]'} (expected a non-empty subset of {PROJECTIONS})")
        if self.skip_layers < 0:
            raise UserError(f"adapter.skip_layers: {self.skip_layers} must be >= 0")
        if not 0 <= self.dropout < 1:
            raise UserError(f"adapter.dropout: {self.dropout} is out of range (expected in [0, 1))")

    @property
    def acts(self) -> str:
        """Where the kind acts: ``slot`` (a per-site delta), ``projection`` (a weight delta) or ``prefix``."""
        return KINDS[self.kind].acts

    @property
    def locations(self) -> tuple[str, ...]:
        """The sites (slot kinds), projections (lora) or self-attention (prefix) of a block that get this adapter."""
        if self.acts == "projection":
            return tuple(self.target_modules)
        if self.acts == "prefix":
            return ("prefix",)
        return PLACEMENTS[self.placement][0]

    @property
    def input_is_normed(self) -> bool:
        return PLACEMENTS[self.placement][1] if self.ln_before is None else self.ln_before

    @property
    def input(self) -> str:
        """What a slot kind reads: ``normed`` LayerNorm(h + residual), ``output`` h, or ``residual``."""
        if KINDS[self.kind].reads_residual:
            return "residual"
        return "normed" if self.input_is_normed else "output"

    @property
    def delta_scale(self) -> float:
        return KINDS[self.kind].scaling if self.scaling is None else self.scaling

    @property
    def phm(self) -> bool:
        """Down- and up-projection are PHM layers sharing one rule (Compacter)."""
        return KINDS[self.kind].phm

    def size(self, hidden_size: int) -> int:
        return self.bottleneck or max(1, hidden_size // self.reduction_factor)


def build_adapter(
    in_features: int, out_features: int, config: AdapterConfig, shared: dict, position: int, sites: int
) -> nn.Module:
    """The module of one adapter at one site (slot kinds: in = out = d), projection (lora: its shape) or
    self-attention (prefix: d), the ``position``-th of the adapter's ``sites``.

    ``shared`` holds what one adapter shares across its sites (compacter's rule matrices, prefix's
    reparametrisation MLP); the caller passes the same dict for every site of one adapter.
    """
    if config.acts == "projection":
        return LoRA(in_features, out_features, config.r, config.alpha, config.dropout)
    if config.acts == "prefix":
        return Prefix(in_features, config, shared, position, sites)
    return BottleneckAdapter(in_features, config, shared)


__all__ = ["INPUTS", "KINDS", "PROJECTIONS", "AdapterConfig", "BottleneckAdapter", "LoRA", "Prefix", "build_adapter"]
