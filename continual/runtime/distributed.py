"""Rank awareness for multi-process runs (Lightning DDP, torchrun, SLURM): who writes, who waits.

With ``trainer.strategy: ddp`` Lightning re-launches the whole command once per extra device (processes
set ``LOCAL_RANK``/``NODE_RANK``; torchrun and SLURM set ``RANK``); every process runs the same sequence
loop. Only the global rank 0 writes (library, checkpoints' stamps, metrics, reports, locks); the others
wait at :func:`barrier` before reading back what it wrote. Evaluations are split across the processes
and gathered, so every rank gets exactly the single-process result.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard() -> tuple[int, int]:
    """(number of shards, this process's shard) for splitting work: (1, 0) without a process group."""
    return (dist.get_world_size(), dist.get_rank()) if initialized() else (1, 0)


def rank() -> int:
    """Global rank: from the process group once it exists, else from the launcher's environment."""
    if initialized():
        return dist.get_rank()
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:  # srun, one task per device
        return int(os.environ["SLURM_PROCID"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return local if node == 0 else node * 1000 + local  # any non-zero value marks "not the writer"


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def on_main(write, *args) -> None:
    """Rank 0 calls ``write(*args)``; every rank then waits for it (one writer under DDP, nothing to wait for alone)."""
    if is_main():
        write(*args)
    barrier()


def gather_tensors(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each rank's tensors concatenated over all ranks (in rank order); unchanged in a single process."""
    if not initialized():
        return tensors
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tuple(t.cpu() for t in tensors))
    return tuple(torch.cat([part[i] for part in parts if part[i].numel() > 0]) for i in range(len(tensors)))
