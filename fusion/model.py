"""A frozen backbone with adapter slots in every block, named adapters, fusions and heads.

The protocol is small (after torchtune/peft): ``add_adapter``/``add_fusion``/``add_head`` create modules,
``activate`` chooses what runs, ``set_trainable`` decides what gets gradients, and ``*_state``/``load_*``
move one artefact's tensors in and out with keys that carry no artefact name
(``"<layer>.<location>.down.weight"``). A module added later takes the model's current train/eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from adafuse.fusion.attention import COMPOSITIONS, FusionConfig, FusionLayer
from adafuse.fusion.compiling import compiled
from adafuse.fusion.composition import WeightedSum
from adafuse.fusion.errors import UserError
from adafuse.fusion.heads import build_head
from adafuse.fusion.kinds import AdapterConfig, build_adapter
from adafuse.fusion.model_state import ArtefactTensors
from adafuse.fusion.quantize import is_quantized
from adafuse.fusion.sites import LOCATIONS, SiteSpec, get_path, set_path, sites_for
from adafuse.fusion.slot import AdapterSlot, PrefixSlot, ProjectionSlot, ResidualTap


class AdaptedModel(ArtefactTensors, nn.Module):
    def __init__(self, backbone: nn.Module, backbone_dropout: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_dropout = backbone_dropout
        self.hidden_size = backbone.config.hidden_size
        self.sites = sites_for(backbone.config.model_type)
        self._slots: dict[tuple[int, str], AdapterSlot] = {}
        self.site_paths: dict[tuple[int, str], str] = {}  # slot -> its path below the base model
        blocks = [
            (stack, i, block) for stack in self.sites.stacks for i, block in enumerate(get_path(backbone, stack.layers))
        ]
        self.blocks = [block for _, _, block in blocks]  # the backbone's own modules (a plain list: not registered)
        self.activation_checkpointing = False
        self.compile_mode = "off"  # forward through torch.compile (adafuse.fusion.compiling) unless "off"
        for index, (stack, i, block) in enumerate(blocks):
            for name, path in stack.projections.items():  # first: a projection may sit inside a replaced sub-layer
                self._slots[(index, name)] = ProjectionSlot(get_path(block, path))
                set_path(block, path, self._slots[(index, name)])
                self.site_paths[(index, name)] = f"{stack.adapterhub_path}.{i}.{path}"
            if stack.prefix:  # second: the self-attention holds the q, k, v projections
                self._slots[(index, "prefix")] = PrefixSlot(get_path(block, stack.prefix))
                set_path(block, stack.prefix, self._slots[(index, "prefix")])
                self.site_paths[(index, "prefix")] = f"{stack.adapterhub_path}.{i}.{stack.prefix}"
            for location in LOCATIONS:
                spec = getattr(stack, location)
                base = get_path(block, spec.module)
                slot = AdapterSlot(base, spec, _site_norm(block, base, spec))
                set_path(block, spec.module, slot)
                if spec.residual_from:
                    set_path(block, spec.residual_from, ResidualTap(get_path(block, spec.residual_from), slot))
                self._slots[(index, location)] = slot
                self.site_paths[(index, location)] = f"{stack.adapterhub_path}.{i}.{spec.adapterhub}"
        self.heads = nn.ModuleDict()
        self.adapter_configs: dict[str, AdapterConfig] = {}
        self.fusion_sources: dict[str, tuple[str, ...]] = {}
        self._head: tuple[nn.Module, ...] = ()  # the active head's module: what forward reads (see AdapterSlot)
        self.active_head: str | None = None
        self.merged: set[str] = set()  # LoRA adapters folded into the backbone's weights (merge_adapter)
        for param in self.backbone.parameters():
            param.requires_grad_(False)

    @property
    def active_head(self) -> str | None:
        return self._active_head

    @active_head.setter
    def active_head(self, name: str | None) -> None:
        self._active_head = name
        self._head = () if name is None else (self.heads[name],)

    @property
    def head_module(self) -> nn.Module:
        """The active head."""
        if len(self._head) == 0:
            raise UserError("no active head: call activate(head=...) first")
        return self._head[0]

    # ---- structure -------------------------------------------------------------------------------------
    def slots(self) -> Iterator[tuple[int, str, AdapterSlot]]:
        for (index, location), slot in self._slots.items():
            yield index, location, slot

    @property
    def device(self) -> torch.device:
        """Where the model is: evaluation and prediction move their batches here."""
        return next(self.parameters()).device

    @property
    def num_layers(self) -> int:
        return 1 + max(index for index, _ in self._slots)

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Add adapter ``name`` of ``config.kind`` at every site (slot kinds) or projection (lora) it names."""
        if name in self.adapter_configs:
            raise UserError(f"adapter '{name}' already exists in the model")
        present = {location for _, location, _ in self.slots()}
        missing = [location for location in config.locations if location not in present]
        if missing:
            raise UserError(
                f"adapter '{name}' ({config.kind}): the {self.backbone.config.model_type} backbone has no "
                f"{_WHERE[config.acts]} {missing}; it has {sorted(present)}"
            )
        if config.skip_layers >= self.num_layers:
            raise UserError(
                f"adapter '{name}': skip_layers {config.skip_layers} leaves none of the {self.num_layers} blocks"
            )
        for site, module in self.new_adapter_modules(config).items():
            self._slots[site].adapters[name] = module.train(self.training)
        self.adapter_configs[name] = config

    def new_adapter_modules(self, config: AdapterConfig) -> dict[tuple[int, str], nn.Module]:
        """Fresh modules of one ``config`` adapter, one per site or projection it names, in slot order (drawn
        from the global RNG); its sites share what the kind shares (Compacter's rule matrices)."""
        shared: dict = {}
        sites = [
            (index, location, slot)
            for index, location, slot in self.slots()
            if location in config.locations and index >= config.skip_layers
        ]
        return {
            (index, location): build_adapter(
                getattr(slot, "in_features", self.hidden_size),
                getattr(slot, "out_features", self.hidden_size),
                config,
                shared,
                position,
                len(sites),
            )
            for position, (index, location, slot) in enumerate(sites)
        }

    def add_head(
        self,
        name: str,
        num_labels: int = 2,
        pooling: str = "auto",
        dropout: float = 0.1,
        head_type: str = "classification",
        **options,
    ) -> None:
        """Add head ``name``: a classification head by default (``pooling`` ``auto`` is the architecture's own),
        or any type of :data:`adafuse.fusion.heads.HEAD_TYPES` with its ``options``."""
        options = {**self.head_options(head_type, num_labels, pooling, dropout), **options}
        self.heads[name] = build_head(self.hidden_size, head_type, **options).train(self.training)

    def head_options(self, head_type: str, num_labels: int = 2, pooling: str = "auto", dropout: float = 0.1) -> dict:
        """The options a head of ``head_type`` takes from the task and the backbone."""
        if head_type in ("classification", "image_classification", "tagging"):  # labels; pooled unless tagging
            pooled = {"pooling": self.resolve_pooling(pooling)} if head_type != "tagging" else {}
            return {"num_labels": num_labels, "dropout": dropout, **pooled}
        # language modelling: the norm's eps and the output scale come from the backbone, as in AdapterHub
        config = self.backbone.config
        tied = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False))
        scale = self.hidden_size**-0.5 if self.sites.lm_scale and tied else 1.0
        embeddings = self.backbone.get_input_embeddings().weight  # (vocab, d): the output layer starts tied
        return {
            "eps": getattr(config, "layer_norm_eps", 1e-12),
            "scale": scale,
            "vocab_size": len(embeddings),
            "embeddings": embeddings,
        }

    def resolve_pooling(self, pooling: str) -> str:
        """``auto`` -> the architecture's pooling (cls for encoders, last token for decoders, mean for T5)."""
        return self.sites.pooling if pooling == "auto" else pooling

    def add_fusion(self, name: str, sources: list[str], config: FusionConfig) -> None:
        """Compose ``sources``: AdapterFusion attention over slot kinds (``config.composition`` attention) or
        one learned weight per LoRA source (weighted, LoraHub)."""
        missing = [s for s in sources if s not in self.adapter_configs]
        if missing:
            raise UserError(
                f"fusion '{name}': unknown source adapters {missing}; known: {sorted(self.adapter_configs)}"
            )
        configs = [self.adapter_configs[s] for s in sources]
        acts = COMPOSITIONS[config.composition]
        wrong = [s for s, c in zip(sources, configs, strict=True) if c.acts != acts]
        if wrong:
            raise UserError(
                f"fusion '{name}': {wrong} cannot be composed by {config.composition}: attention fuses per-site "
                f"deltas (bottleneck, parallel, compacter), weighted composes weight deltas (lora)"
            )
        if acts == "projection":  # a weighted sum of deltas needs the same projections
            shapes = {c.locations for c in configs}
        else:  # the fast path needs one input, one bottleneck size and one non-linearity
            shapes = {(c.locations, c.size(self.hidden_size), c.non_linearity, c.input) for c in configs}
        if len(shapes) > 1:
            raise UserError(f"fusion '{name}': sources differ in sites/size/non-linearity/input: {sorted(shapes)}")
        slots = [  # where every source has a module (AdapterDrop: above the lowest blocks)
            slot
            for index, location, slot in self.slots()
            if location in configs[0].locations
            and index >= config.skip_layers
            and all(s in slot.adapters for s in sources)
        ]
        if not slots:
            raise UserError(f"fusion '{name}': no block holds all of {list(sources)} above skip_layers")
        if acts == "projection":
            weights = nn.Parameter(torch.zeros(len(sources)))  # inert at init: the bare backbone
            for slot in slots:
                slot.fusions[name] = WeightedSum(weights, config, 1 / len(slots)).train(self.training)
        else:
            for slot in slots:
                slot.fusions[name] = FusionLayer(self.hidden_size, config).train(self.training)
        self.fusion_sources[name] = tuple(sources)

    def merge_adapter(self, name: str) -> None:
        """Fold LoRA adapter ``name`` into the projections' weights (W += alpha/r B A) for inference: the model
        then runs at the bare backbone's cost and computes what the active adapter computed (to float rounding).
        The backbone no longer equals the library's: for serving one adapter, not for training."""
        config = self.adapter_configs.get(name)
        if config is None or config.acts != "projection":
            kind = config.kind if config else "unknown"
            raise UserError(f"adapter '{name}' ({kind}) cannot be merged: only weight deltas (lora) fold into weights")
        with torch.no_grad():
            for _, _, slot in self.slots():
                if name in slot.adapters:
                    if is_quantized(slot.base.weight):
                        raise UserError(f"adapter '{name}' cannot be merged into quantized projections")
                    slot.base.weight += slot.adapters[name].delta_weight().to(slot.base.weight.dtype)
        self.delete_adapter(name)
        self.merged.add(name)

    def delete_adapter(self, name: str) -> None:
        self._delete_from_slots(name, "adapters")
        self.adapter_configs.pop(name, None)

    def delete_fusion(self, name: str) -> None:
        self._delete_from_slots(name, "fusions")
        self.fusion_sources.pop(name, None)

    def _delete_from_slots(self, name: str, kind: str) -> None:
        for _, _, slot in self.slots():
            slot.forget_maps()  # memoised fusion maps may hold the deleted tensors
            slot.drop(name)
            container = getattr(slot, kind)
            if name in container:
                del container[name]

    # ---- what runs and what trains -----------------------------------------------------------------------
    def activate(
        self,
        adapters: list[str] | tuple[str, ...] = (),
        fusion: str | None = None,
        head: str | None = None,
        skip_layers: int = 0,
    ):
        """Choose the active adapters (their deltas add up) or one fusion, and the head.

        ``skip_layers`` = N leaves the adapters and fusions of the lowest N blocks out (AdapterDrop,
        Rücklé et al. 2021): those blocks run as the bare backbone.
        """
        for name in adapters:
            if name not in self.adapter_configs:
                raise UserError(f"unknown adapter '{name}'; known: {sorted(self.adapter_configs)}")
        if fusion is not None and fusion not in self.fusion_sources:
            raise UserError(f"unknown fusion '{fusion}'; known: {sorted(self.fusion_sources)}")
        if head is not None and head not in self.heads:
            raise UserError(f"unknown head '{head}'; known: {sorted(self.heads)}")
        for index, _, slot in self.slots():
            kept = index >= skip_layers
            slot.active = tuple(a for a in adapters if a in slot.adapters) if kept else ()
            slot.active_fusion = (fusion, self.fusion_sources[fusion]) if kept and fusion in slot.fusions else None
            slot.routes = None
        self.active_head = head

    def route(self, rows: dict[str, torch.Tensor], skip_layers: int = 0) -> None:
        """Mixed-task batches: ``rows[name]`` are the batch rows that go through adapter or fusion ``name``.

        One forward pass serves every task; apply each task's head to its rows of :meth:`encode`'s output.
        """
        for name in rows:
            if name not in self.adapter_configs and name not in self.fusion_sources and name not in self.merged:
                raise UserError(f"unknown adapter or fusion '{name}'")
        self.activate(skip_layers=skip_layers)
        for index, _, slot in self.slots():
            routes = [
                (name, self.fusion_sources.get(name, ()), index_rows)
                for name, index_rows in rows.items()
                if name in slot.fusions or (name in slot.adapters and name not in self.fusion_sources)
            ]
            slot.routes = routes if index >= skip_layers and routes else None

    @contextlib.contextmanager
    def bare_backbone(self):
        """Run the backbone without any adapter or fusion inside the block (the head stays)."""
        saved = [(slot.active, slot.active_fusion, slot.routes) for _, _, slot in self.slots()]
        for _, _, slot in self.slots():
            slot.active, slot.active_fusion, slot.routes = (), None, None
        try:
            yield self
        finally:
            for (_, _, slot), (active, fused, routes) in zip(self.slots(), saved, strict=True):
                slot.active, slot.active_fusion, slot.routes = active, fused, routes

    def set_trainable(self, adapters=(), fusions=(), heads=(), backbone: bool = False) -> None:
        """Exactly the named adapters, fusions and heads (and the backbone only if asked) require grad."""
        for param in self.parameters():
            param.requires_grad_(False)
        if backbone:
            for param in self.backbone_weights():
                param.requires_grad_(True)
        for module in self._artefact_modules(adapters, fusions, heads):
            for param in module.parameters():
                param.requires_grad_(True)

    def backbone_weights(self) -> Iterator[nn.Parameter]:
        """The backbone's own parameters: not the adapters and fusions its slots hold."""
        for name, param in self.backbone.named_parameters():
            if ".adapters." not in name and ".fusions." not in name:
                yield param

    def _artefact_modules(self, adapters=(), fusions=(), heads=()) -> Iterator[nn.Module]:
        for _, _, slot in self.slots():
            yield from (slot.adapters[a] for a in adapters if a in slot.adapters)
            yield from (slot.fusions[f] for f in fusions if f in slot.fusions)
        yield from (self.heads[h] for h in heads)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.backbone_dropout:
            self.backbone.eval()  # frozen backbone: dropout off; adapters and fusions follow `mode`
            for _, _, slot in self.slots():
                slot.adapters.train(mode)
                slot.fusions.train(mode)
        if mode and self.activation_checkpointing:
            for block in self.blocks:  # the block's own flag only (transformers checkpoints a training layer);
                block.training = True  # its dropout modules keep theirs
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's forward, its adapters and fusion included, in the backward pass instead of
        keeping its activations (``torch.utils.checkpoint``, non-reentrant: the same gradients, dropout masks
        replayed from the saved random state). Only training steps are affected; evaluation keeps no activations
        anyway. Uses transformers' checkpointing layers (every block of the sites table is one since transformers
        4.52)."""
        import functools

        from torch.utils.checkpoint import checkpoint

        try:
            from transformers.modeling_layers import GradientCheckpointingLayer as Checkpointable
        except ImportError:
            Checkpointable = None  # noqa: N806 - a class or nothing
        if enabled and (Checkpointable is None or not all(isinstance(b, Checkpointable) for b in self.blocks)):
            raise UserError(
                f"trainer.activation_checkpointing: the {self.backbone.config.model_type} blocks of this transformers "
                "version cannot recompute their forward (needs transformers >= 4.52)"
            )
        for block in self.blocks:
            block.gradient_checkpointing = enabled
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False) if enabled else None
        self.activation_checkpointing = enabled
        self.train(self.training)

    def fusion_regularization(self) -> torch.Tensor:
        losses = [
            slot.fusions[f].regularization_loss()
            for f in self._active_fusions()
            for _, _, slot in self.slots()
            if f in slot.fusions
        ]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def _active_fusions(self) -> set[str]:
        return {slot.active_fusion[0] for _, _, slot in self.slots() if slot.active_fusion is not None}

    def set_fusion_temperature(self, temperature: float) -> None:
        for _, _, slot in self.slots():
            for fusion in slot.fusions.values():
                fusion.temperature = temperature

    # ---- forward --------------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """Last hidden states (B, L, d). An encoder-decoder without ``decoder_input_ids`` runs its encoder
        (``features`` in the sites table): that is what a classification head reads. Compiled unless
        ``compile_mode`` is ``off``/``auto``; decoding steps (a key/value cache passed) run eagerly, as their
        shapes change with every token."""
        eager = self.compile_mode in ("off", "auto") or torch.compiler.is_compiling()
        if eager or "past_key_values" in kwargs or "encoder_outputs" in kwargs:
            return encoded(self, input_ids, attention_mask, **kwargs)
        return compiled(encoded, self.compile_mode)(self, input_ids, attention_mask, **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """Logits of the active head: (B, C) for classification, (B, L, vocab) for language modelling; compiled
        unless ``compile_mode`` is ``off`` (or ``auto``, before a training run decided to compile)."""
        self.head_module  # noqa: B018 - refuses a model without an active head, in one line
        if self.compile_mode in ("off", "auto") or torch.compiler.is_compiling():
            return logits(self, input_ids, attention_mask, **kwargs)
        return compiled(logits, self.compile_mode)(self, input_ids, attention_mask, **kwargs)


def encoded(model: AdaptedModel, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """What :meth:`AdaptedModel.encode` computes, compiled or not."""
    encoder = model.backbone
    if model.sites.features is not None and "decoder_input_ids" not in kwargs:
        encoder = get_path(model.backbone, model.sites.features)
    if not getattr(model.backbone.config, "type_vocab_size", 0):  # a BERT tokenizer's segment ids: not used here
        kwargs.pop("token_type_ids", None)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if model.activation_checkpointing and model.training and getattr(model.backbone.config, "use_cache", None):
        kwargs.setdefault("use_cache", False)  # a recomputed block must not add its keys and values twice
    hidden = encoder(**kwargs).last_hidden_state
    return hidden.float() if hidden.dtype in (torch.bfloat16, torch.float16) else hidden  # float32 heads


def logits(model: AdaptedModel, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """The active head over the encoded batch (what :meth:`AdaptedModel.forward` runs, compiled or not)."""
    hidden = encoded(model, input_ids, attention_mask, **kwargs)  # (B, L, d)
    return model.head_module(hidden, attention_mask)


_WHERE = {"slot": "sites", "projection": "projections", "prefix": "self-attention site (prefix tuning)"}


def _site_norm(block: nn.Module, base: nn.Module, spec: SiteSpec) -> nn.Module | None:
    """The norm a slot applies: the module's own (inner), the block's after the slot (outer), none (pre_ln)."""
    if spec.norm is None:
        return None
    return get_path(base if spec.mode == "inner" else block, spec.norm)
