"""What every job (``run``, ``fuse``) shares: the loaded backbone and its fingerprint, the claimed output and
library folders (held under run locks for the job's life), trainable-parameter counts, and the seeded initial
states of adapters and heads (drawn from a generator seeded per artefact, so an untrained task evaluated for
FWT starts from exactly the weights its training will start from)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from adafuse.continual.config import HeadConfig, JobConfig
from adafuse.continual.runtime.distributed import is_main
from adafuse.continual.runtime.hardware import check_backbone_dtype
from adafuse.continual.runtime.sharding import check_shardable
from adafuse.fusion.backbone import check_max_length, load_model, load_tokenizer
from adafuse.fusion.errors import UserError
from adafuse.fusion.fingerprint import fingerprint
from adafuse.fusion.heads import build_head
from adafuse.fusion.library import RUN_LOCK
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.storage import FileLock
from adafuse.tasks.spec import TaskData
from adafuse.tasks.types import task_type


@dataclass
class Environment:
    """What every job needs: the loaded backbone, its tokenizer and fingerprint, and the model around it."""

    model: AdaptedModel
    tokenizer: object
    fingerprint: str
    backbone_params: int


def prepare_environment(config, tasks=()) -> Environment:
    """Load tokenizer and backbone; refuse a ``max_length`` (the job's or a task's) beyond its positions."""
    if config.trainer.threads:
        torch.set_num_threads(config.trainer.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    check_backbone_dtype(config.backbone.dtype, config.trainer.accelerator)
    check_shardable(config, tasks)
    tokenizer = load_tokenizer(config.backbone)
    backbone = load_model(config.backbone)
    check_max_length(backbone, config.max_length)
    for task in tasks:
        check_max_length(backbone, task.max_length, f"task '{task.name}' max_length")
    fp = fingerprint(backbone)
    params = sum(p.numel() for p in backbone.parameters())
    model = AdaptedModel(backbone, config.backbone.dropout)
    model.set_activation_checkpointing(config.trainer.activation_checkpointing)
    return Environment(model, tokenizer, fp, params)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def claimed_output(out: Path, library_dir: Path):
    """Create the output and library folders and hold their run locks for the whole job: a second job on
    either gets a clear error naming this process. A lock dies with its process (no stale locks)."""
    if not is_main():  # under DDP the writer (rank 0) holds the locks; the other ranks only read
        yield out
        return
    with contextlib.ExitStack() as stack:
        for folder in [out] if out.resolve() == library_dir.resolve() else [out, library_dir]:
            if folder.exists() and not folder.is_dir():
                raise UserError(f"'{folder}' is a file; expected a folder (or a path that does not exist yet)")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create folder '{folder}': {err.strerror}") from None
            stack.enter_context(FileLock(folder / RUN_LOCK, blocking=False))
        yield out


def seeded_head_state(model: AdaptedModel, task: TaskData, head: HeadConfig, seed: int) -> dict[str, torch.Tensor]:
    """Initial tensors of ``task``'s head (its type's) drawn from ``seed`` (the global RNG is left untouched)."""
    head_type = task_type(task.type).head_for(model.sites)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build_head(
            model.hidden_size, head_type, **model.head_options(head_type, task.num_labels, head.pooling, head.dropout)
        )
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def seeded_adapter_state(model: AdaptedModel, config: JobConfig, seed: int) -> dict[str, torch.Tensor]:
    """Initial tensors of an adapter ("<layer>.<location>.down.weight", ...) drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        modules = model.new_adapter_modules(config.adapter)
    return {f"{i}.{loc}.{k}": v for (i, loc), module in modules.items() for k, v in module.state_dict().items()}
