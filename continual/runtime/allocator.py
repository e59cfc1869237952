"""glibc malloc settings for CPU tensor work (Linux only; ``ADAFUSE_MALLOC=default`` leaves malloc alone).

PyTorch's CPU allocator calls malloc/free for every tensor. glibc serves a block above its mmap threshold
(128 KiB at start, raised on the fly up to 32 MiB) from fresh mmap'd pages, and hands a freed heap top
above its trim threshold back to the OS; either way the next allocation of that size touches new pages,
one page fault per 4 KiB. A MiniLM batch of 16 x 128 tokens allocates and frees the same 3-12 MB
activations in every layer and took ~22,000 page faults per inference step that way (measured with
``ru_minflt``); how many depends on the order of earlier allocations, so adding a module to a block
also slowed the unchanged blocks around it by a few percent. Fixed thresholds keep freed blocks in the
heap for reuse: 0 faults per step after the first, no change in peak memory (PyTorch's CPU tuning guide
reaches the same end with jemalloc or tcmalloc preloaded).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**30


@functools.cache
def _glibc(name: str):
    """glibc's function ``name``, looked up once; None off Linux or on another C library (musl, ...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if they were set."""
    if os.environ.get("ADAFUSE_MALLOC", "tuned") == "default":
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def return_freed_blocks() -> bool:
    """From now on, serve every block above 64 KiB from its own pages and hand it back when freed; True if set.

    For a sharded backbone on the CPU (``trainer.strategy: fsdp``): each step gathers every block's weights and
    frees them again, in pieces whose sizes and order the heap does not fit back together, so with the fixed
    thresholds above the process grew by tens of megabytes a step; with this, it stays at its live tensors.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None or os.environ.get("ADAFUSE_MALLOC", "tuned") == "default":
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 64 * 2**10)) and bool(mallopt(M_TRIM_THRESHOLD, 0))


def release_free_memory() -> bool:
    """Hand the free pages inside malloc's heaps back to the OS (``malloc_trim(0)``); True if any were.

    The fixed thresholds above keep freed blocks for reuse, which is what a training loop of repeating shapes
    wants. A server's batches differ in rows, lengths and adapters from one pass to the next, so its free blocks
    fragment into sizes the next pass may not fit, and the process grows with the variety of its traffic; a
    periodic trim returns the free pages and keeps the live ones.
    """
    trim = _glibc("malloc_trim")  # called after every pass of a server: looked up once
    return trim is not None and bool(trim(0))
