"""``torch.compile`` for adapted models: the modes, one compiled wrapper per function and mode, and ``auto``.

The functions compiled here are module-level (:func:`adafuse.fusion.model.logits`, the training module's
step): dynamo keeps compiled code on a function's code object, so every task's module, every evaluation
and every prediction shares it. The slots and the model hand ``forward`` modules, not names, so the guards
are on kinds and shapes: switching the active adapter, fusion or head reuses the code (tested).

``ADAFUSE_COMPILE_BACKEND`` picks another dynamo backend (``aot_eager``: the same graphs and autograd, no
code generation) to check graphs quickly; the default is inductor.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch

MODES = ("off", "default", "reduce-overhead", "max-autotune", "auto")


def check_mode(key: str, mode: str) -> None:
    """One line naming ``key`` when ``mode`` is not a compile mode."""
    from adafuse.fusion.errors import UserError

    if mode not in MODES:
        raise UserError(f"{key}: '{mode}' is not one of {', '.join(MODES)}")


@functools.cache
def compiled(fn: Callable, mode: str) -> Callable:
    """``fn`` compiled in ``mode`` (``default``, ``reduce-overhead``: CUDA graphs on CUDA, ``max-autotune``)."""
    backend = os.environ.get("ADAFUSE_COMPILE_BACKEND", "inductor")
    options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    return torch.compile(fn, backend=backend, **options)


def without_grad(model):
    """The no-autograd context for evaluating ``model``: ``torch.inference_mode`` eagerly; ``torch.no_grad`` when
    it runs compiled, as validation inside training does, so both share one compilation (inference tensors
    would not pass the other's guards)."""
    eager = getattr(model, "compile_mode", "off") in ("off", "auto")  # auto: eager until a training run decides
    return torch.inference_mode() if eager else torch.no_grad()


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class AutoCompile:
    """``compile: auto``: time eager steps, then compiled ones, and keep compiling only where it pays.

    Steps 1..``probe`` run eagerly (the first one is warm-up); the next call compiles (its time, less one compiled
    step, is the compile time); ``probe`` compiled steps follow. The decision, printed in one line: compiled when
    it is faster per step and the steps left repay the compile time (``break-even`` = compile time / saving per
    step), else eager for the rest of the run. The compile time is spent before it is known: a later run of the
    same shapes finds inductor's cache and pays much less.
    """

    def __init__(self, planned_steps: int, probe: int = 3, log: Callable[[str], None] = print) -> None:
        self.planned, self.probe, self.log = planned_steps, probe, log
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.first_compiled: float | None = None
        self.decision: str | None = None  # "compiled" | "eager" once decided

    def use_compiled(self) -> bool:
        """Whether the next step runs compiled."""
        if self.decision is not None:
            return self.decision == "compiled"
        return len(self.eager) > self.probe

    def record(self, seconds: float) -> None:
        """The wall time of the step just run (after a device synchronisation)."""
        if self.decision is not None:
            return
        if len(self.eager) <= self.probe:
            self.eager.append(seconds)
        elif self.first_compiled is None:
            self.first_compiled = seconds
        else:
            self.compiled.append(seconds)
            if len(self.compiled) == self.probe:
                self._decide()

    def _decide(self) -> None:
        eager = sorted(self.eager[1:])[len(self.eager[1:]) // 2]  # medians
        fast = sorted(self.compiled)[len(self.compiled) // 2]
        compile_s = max(0.0, self.first_compiled - fast)
        saving = eager - fast
        left = max(0, self.planned - len(self.eager) - 1 - len(self.compiled))
        if saving <= 0:
            self.decision = "eager"
            why = "no faster than eager"
        else:
            break_even = compile_s / saving
            self.decision = "compiled" if left >= break_even else "eager"
            why = f"saves {saving * 1e3:.1f} ms a step, break-even after {break_even:.0f} steps, {left} left"
        self.log(
            f"compile auto: eager {eager * 1e3:.1f} ms/step, compiled {fast * 1e3:.1f} ms/step, compiling took "
            f"{compile_s:.1f} s; {why}: {self.decision} for the rest of the run"
        )


class StepTimer:
    """Wall time of one step, synchronising the device first and last (CUDA runs asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> StepTimer:
        self._sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
