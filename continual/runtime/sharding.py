"""``trainer.strategy: fsdp``: the frozen backbone's weights sharded across the processes, while adapters,
fusions and heads stay whole on every process and train data-parallel.

Each block of the sites table is one FSDP unit (PyTorch's ``fully_shard``, FSDP2), and so is a language-model
head not tied to the input embeddings (never gathered: only decoding runs it); the rest of what the model runs
(final norm, position embeddings; an encoder-decoder's encoder, which classifies and tags) is the root unit. A
process keeps 1/N of every frozen weight and gathers a unit's weights just before it runs (again for the
backward pass), which holds the unit twice over for a moment (the gathered buffer and the weights copied out
of it). The input embeddings stay whole on every process: they are usually the largest table, and gathering
it would cost twice its size at every step, more than keeping it (1 - 1/N of it) saves.
Only the backbone's own weights are sharded: adapters, fusions and heads are left out of the units, so library
writes, checkpoints and loading a stored adapter see whole tensors as under ``ddp``, and Lightning's DDP
all-reduces their gradients while ignoring the sharded weights.

Every forward pass is a collective: all processes must run the same number of them. Lightning's distributed
samplers give every process the same number of training and validation batches; the monitor's evaluations run
spare passes where a process has fewer batches (:func:`adafuse.continual.training.evaluate.predict_logits`).
Decoding, whose number of steps depends on the rows, is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adafuse.continual.runtime.allocator import release_free_memory, return_freed_blocks
from adafuse.continual.runtime.distributed import initialized, is_main
from adafuse.fusion.errors import UserError
from adafuse.fusion.sites import get_path


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_backbone` has sharded ``model``'s backbone (every forward pass is then a collective)."""
    return getattr(model, "sharded_backbone", False)


def not_sharded(model) -> set[nn.Parameter]:
    """What stays whole on every process: adapters, fusions, heads, and anything that trains."""
    own = set(model.backbone_weights())
    return {p for p in model.parameters() if p.requires_grad or p not in own}


def shard_backbone(model, device: torch.device) -> list[str]:
    """Shard ``model``'s frozen backbone over the process group (once); the names of the parameters Lightning's
    DDP must leave alone (the frozen ones: the sharded weights and frozen adapters alike)."""
    if not initialized():
        raise UserError("trainer.strategy: fsdp needs the process group Lightning starts (run through adafuse)")
    if torch.distributed.get_world_size() == 1:  # nothing to split: the model runs as it is, without collectives
        if not getattr(model, "told_unsharded", False):
            print("trainer.strategy fsdp on one process: nothing to shard, the backbone stays whole")
            model.told_unsharded = True
    elif not is_sharded(model):
        _fully_shard(model, device)
        model.sharded_backbone = True
        release_free_memory()  # the whole weights just freed: back to the OS, not kept in malloc's heap
        if device.type == "cpu":
            return_freed_blocks()  # the gathered weights of every step too
        if is_main():
            print(
                f"trainer.strategy fsdp: each process holds {local_share(model):.0%} of the backbone's weights "
                f"(the input embeddings whole, the rest split {torch.distributed.get_world_size()} ways)"
            )
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def _fully_shard(model, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    inputs = model.backbone.get_input_embeddings()
    keep = not_sharded(model) | set(inputs.parameters())  # the input embeddings stay whole (see above)
    with torch.no_grad():
        for param in inputs.parameters():  # their own memory: a view keeps the whole mapped checkpoint file
            param.data = param.data.clone()  # resident after the sharded weights have left it
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=keep)
    output = model.backbone.get_output_embeddings() if hasattr(model.backbone, "get_output_embeddings") else None
    if output is not None and not set(output.parameters()) & keep:  # an untied language-model head: sharded,
        fully_shard(output, mesh=mesh, ignored_params=keep)  # never gathered (only decoding reads it)
    # the root unit: what the model runs (an encoder-decoder's encoder when it classifies or tags)
    root = get_path(model.backbone, model.sites.features) if model.sites.features else model.backbone
    fully_shard(root, mesh=mesh, ignored_params=keep)


def local_share(model) -> float:
    """The share of the backbone's own weights this process holds (1.0 unsharded)."""
    from torch.distributed.tensor import DTensor

    own = list(model.backbone_weights())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in own)
    return held / max(1, sum(p.numel() for p in own))


def check_shardable(config, tasks=()) -> None:
    """Refuse, in one line, what ``trainer.strategy: fsdp`` cannot run."""
    if config.trainer.strategy != "fsdp":
        return
    method = getattr(config, "method", "adapters")  # a fusion job has none: it trains a fusion or an adapter
    base = getattr(config, "base_method", method)
    if config.backbone.quantization != "none":
        why = f"backbone.quantization: '{config.backbone.quantization}' weights are not plain tensors to shard"
    elif config.trainer.compile != "off":
        why = f"trainer.compile: '{config.trainer.compile}' is not supported on a sharded backbone"
    elif base == "full-finetune":
        why = f"{'method' if base == method else 'strategy.base'}: 'full-finetune' trains the backbone"
    else:
        generation = [task.name for task in tasks if task.type == "generation"]
        why = generation and (
            f"task '{generation[0]}': generation decodes as many steps as its rows need, and every step of a "
            "sharded backbone is a collective"
        )
    if why:
        raise UserError(f"{why}; trainer.strategy: fsdp shards a frozen backbone (use ddp here)")
