"""The model side of ``predict`` and ``serve``: a library's adapters and fusions loaded on demand (verified on
load), and rows of any of them routed through one forward pass, each task's head reading its own rows."""

from __future__ import annotations

import torch

from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.continual.runtime.hardware import check_bf16_cpu
from adafuse.fusion.errors import UserError
from adafuse.tasks.types import TASK_TYPES
from adafuse.tasks.types.base import group_rows

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # --precision: autocast dtype


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: float32), or one line saying why it cannot run."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if device.type == "cpu":
        if precision == "16-mixed":
            raise UserError("--precision 16-mixed needs a CUDA device (--device cuda); on a CPU use bf16-mixed or 32")
        check_bf16_cpu("--precision", precision, instead="32")
    return PRECISIONS[precision]


class Predictor:
    """Routes a batch of (text, task) rows through one pass of the model and each task's head, in float32 or under
    autocast in ``autocast``'s dtype (what :func:`autocast_dtype` resolves ``--precision`` to)."""

    def __init__(
        self,
        opened: LibraryModel,
        max_length: int,
        device: torch.device,
        drop_layers: int,
        autocast: torch.dtype | None = None,
    ) -> None:
        if not 0 <= drop_layers <= opened.model.num_layers:
            raise UserError(f"--drop-layers {drop_layers}: expected 0..{opened.model.num_layers}")
        self.autocast = autocast
        self.opened = opened
        self.max_length = max_length
        self.device = device
        self.drop_layers = drop_layers
        self.kinds: dict[str, str] = {}  # loaded task -> adapter | fusion, least recently used first
        self.needs: dict[str, set[str]] = {}  # loaded task -> the adapters it runs (a fusion: its sources)
        opened.model.to(device).eval()  # the backbone is there already; this moves the adapter modules

    def add_task(self, name: str, where: str = "") -> None:
        """Load adapter or fusion ``name`` and the head of the same name (or mark it as just used)."""
        if name in self.kinds:
            self.kinds[name] = self.kinds.pop(name)  # most recently used last
            return
        library = self.opened.library
        kind = "fusion" if library.find("fusion", name) else "adapter" if library.find("adapter", name) else None
        if kind is None or library.find("head", name) is None:
            known = sorted(e["name"] for e in library.entries("head"))
            raise UserError(
                f"{where}task '{name}' is not an adapter or fusion with a head in '{library.root}' (has: {known})"
            )
        sources = self.opened.load_fusion(name) if kind == "fusion" else self.opened.load_adapter(name)
        self.opened.load_head(name)
        self.opened.model.to(self.device).eval()  # new modules start in training mode
        self.kinds[name] = kind
        self.needs[name] = set(sources) if kind == "fusion" else {name}

    def trim(self, max_loaded: int) -> list[str]:
        """Unload the least recently used adapters and fusions (with their heads) beyond ``max_loaded``; an adapter
        stays while a loaded fusion still runs it. Returns the names unloaded."""
        model, unloaded = self.opened.model, []
        while max_loaded > 0 and len(self.kinds) > max_loaded:
            name = next(iter(self.kinds))
            kind = self.kinds.pop(name)
            needs = self.needs.pop(name)
            if kind == "fusion":
                model.delete_fusion(name)
            for adapter in needs - set().union(*self.needs.values()):
                model.delete_adapter(adapter)
            del model.heads[name]
            self.opened.label_names.pop(name, None)
            self.opened.task_types.pop(name, None)
            unloaded.append(name)
        return unloaded

    @torch.no_grad()
    def __call__(self, texts: list, tasks: list[str]) -> list[dict]:
        """One output per row; rows of one task type share a forward pass, each task's head reads its rows."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self._outputs(texts, tasks)

    def _outputs(self, texts: list, tasks: list[str]) -> list[dict]:
        opened = self.opened
        results: list[dict | None] = [None] * len(texts)
        for name, members in group_rows([opened.task_types[task] for task in tasks]).items():
            outputs = TASK_TYPES[name].predict(
                opened.model,
                opened.tokenizer,
                [texts[r] for r in members],
                [tasks[r] for r in members],
                self.max_length,
                self.drop_layers,
                opened.label_names,
            )
            for row, output in zip(members, outputs, strict=True):
                results[row] = output
        return results


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}': expected cpu, cuda, cuda:N or auto") from None
