"""How each method of a task sequence trains, stores and evaluates (the runner stays method-agnostic).

* ``adapters``: one new adapter + head per task; earlier adapters frozen (isolation, no forgetting).
* ``shared-adapter``: one adapter trained through all tasks, a head per task (a forgetting baseline).
* ``full-finetune``: the backbone itself trained through the tasks, a head per task (a forgetting baseline).
* ``ewc``, ``lwf``, ``replay``: a continual-learning strategy (:mod:`adafuse.continual.strategies`) on the
  trainable set of ``strategy.base`` (shared-adapter or full-finetune); artefacts are named ``<method>@<task>``.

Every initial state (adapter, head) is drawn from a generator seeded by (seed, task), so an untrained
task evaluated for FWT starts from exactly the weights its training will start from.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from adafuse.continual.config import RunConfig, to_dict
from adafuse.continual.jobs.job import seeded_adapter_state, seeded_head_state
from adafuse.continual.names import STRATEGY_METHODS
from adafuse.continual.routing.class_incremental import evaluate_class_incremental
from adafuse.continual.routing.lda import LdaRouter, bare_features, task_statistics
from adafuse.continual.routing.trained import TrainedRouter, kept_examples, stored_router, train_router
from adafuse.continual.strategies import strategy_for
from adafuse.continual.training.evaluate import evaluate
from adafuse.fusion.heads import build_head
from adafuse.fusion.library import AdapterLibrary
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.storage import atomic_write
from adafuse.tasks.spec import TaskData
from adafuse.tasks.types import task_type

SHARED = "shared"


class SequenceMethod:
    prefix = ""
    isolated = False  # one adapter per task: class-incremental evaluation routes inputs to tasks

    def __init__(
        self,
        config: RunConfig,
        model: AdaptedModel,
        library: AdapterLibrary,
        fingerprint: str,
        tasks: list[TaskData],
        loaders,
        checkpoint_dir: Path,
        train_data: list | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.library = library
        self.fingerprint = fingerprint
        self.tasks = tasks
        self.loaders = loaders  # task index -> test DataLoader
        self.checkpoint_dir = checkpoint_dir
        self.train_data = train_data  # task index -> TaskDataModule (what a strategy reads)
        self.strategy = strategy_for(config.method, config.strategy)
        self._routers: dict[int, dict[str, torch.Tensor]] = {}
        if config.method in STRATEGY_METHODS:
            self.prefix = f"{config.method}@"

    # ---- names and initial states ------------------------------------------------------------------------
    def name(self, i: int) -> str:
        return f"{self.prefix}{self.tasks[i].name}"

    def _seed(self, i: int, salt: int) -> int:
        return self.config.seed * 1_000_003 + 7919 * i + salt

    def ensure_head(self, i: int, fresh: bool = False) -> str:
        name = self.name(i)
        if name not in self.model.heads:
            task, head = self.tasks[i], self.config.head
            self.model.add_head(
                name, task.num_labels, head.pooling, head.dropout, task_type(task.type).head_for(self.model.sites)
            )
            fresh = True
        if fresh:
            state = seeded_head_state(self.model, self.tasks[i], self.config.head, self._seed(i, 1))
            self.model.load_head_state(name, state)
        return name

    def ensure_adapter(self, name: str, seed: int, fresh: bool = False) -> str:
        if name not in self.model.adapter_configs:
            self.model.add_adapter(name, self.config.adapter)
            fresh = True
        if fresh:
            self.model.load_adapter_state(name, seeded_adapter_state(self.model, self.config, seed))
        return name

    # ---- library ---------------------------------------------------------------------------------------------
    def entry_config(self, i: int) -> dict:
        return {
            "method": self.config.method,
            "adapter": to_dict(self.config.adapter),
            "head": {**to_dict(self.config.head), "type": task_type(self.tasks[i].type).head_for(self.model.sites)},
            "task_type": self.tasks[i].type,
            "label_names": self.tasks[i].label_names,
            "num_labels": self.tasks[i].num_labels,
        }

    def is_done(self, i: int) -> bool:
        entry = self.library.find("head", self.name(i))
        return (
            (not self.strategy.stateful or self._strategy_file(i).is_file())
            and entry is not None
            and entry["fingerprint"] == self.fingerprint
            and entry["config"].get("method") == self.config.method
            and entry["config"].get("label_names") == self.tasks[i].label_names
        )

    def load_head(self, i: int) -> str:
        name = self.ensure_head(i)
        self.model.load_head_state(name, self.library.load("head", name, self.fingerprint).tensors)
        return name

    def write_artefact(
        self, kind: str, i: int, tensors: dict[str, torch.Tensor], metrics: dict, extra: dict | None = None
    ) -> None:
        """Store task i's adapter, head or router under the method's name for that task (``extra`` joins its
        config)."""
        self.library.add(
            kind,
            self.name(i),
            tensors,
            fingerprint=self.fingerprint,
            config={**self.entry_config(i), **(extra or {})},
            task=self.tasks[i].name,
            metrics=metrics,
            backbone=to_dict(self.config.backbone),
        )

    def frozen_head(self, j: int) -> torch.nn.Module:
        """A frozen copy of task j's head as the library holds it (outside the model's heads)."""
        head_type = task_type(self.tasks[j].type).head_for(self.model.sites)
        head = self.config.head
        options = self.model.head_options(head_type, self.tasks[j].num_labels, head.pooling, head.dropout)
        module = build_head(self.model.hidden_size, head_type, **options)
        module.load_state_dict(self.library.load("head", self.name(j), self.fingerprint).tensors)
        return module.requires_grad_(False).eval()

    # ---- the strategy around training: before, after, resume -------------------------------------------------
    def before_task(self, i: int) -> None:
        self.strategy.before_task(i, self, self.train_data[i])

    def finish(self, i: int, metrics: dict) -> None:
        """Task i's best weights are back: the strategy takes what it keeps (saved first), then the artefacts."""
        self.strategy.after_task(i, self, self.train_data[i])
        if self.strategy.stateful:
            state = {k: v.detach().contiguous().cpu() for k, v in self.strategy.state().items()}
            atomic_write(self._strategy_file(i), save(state))
        self.write(i, metrics)

    def resume(self, i: int) -> None:
        """Bring the model and the strategy to their state after finished task i."""
        self.restore(i)
        if self.strategy.stateful:
            self.strategy.load_state(load_file(str(self._strategy_file(i))))

    def _strategy_file(self, i: int) -> Path:
        return self.checkpoint_dir / f"strategy@{self.name(i)}.safetensors"

    def write_head(self, i: int, metrics: dict) -> None:
        self.write_artefact("head", i, self.model.head_state(self.name(i)), metrics)

    def evaluate(self, j: int, i: int, live: bool = False) -> dict[str, float]:
        """Evaluate task j after task i; task j's modules leave the model afterwards unless j is the current
        task, so memory stays flat however long the sequence (one adapter trains, one is evaluated).
        Class-incremental: without the task, among every class seen (:mod:`.class_incremental`)."""
        class_incremental = self.config.setting == "class-incremental"
        try:
            if class_incremental:
                return evaluate_class_incremental(self, j, i, live)
            self.select(j, i, live)
            return evaluate(self.model, self.loaders[j], None, self.tasks[j].type, self.tasks[j].label_names)
        finally:
            for t in range(max(i, j) + 1) if class_incremental else [j]:
                if t != i:
                    self.release(t)

    def router(self, t: int) -> dict[str, torch.Tensor]:
        """Task t's router statistics on the bare backbone (:mod:`.router`): the same before and after training."""
        if t not in self._routers:
            features, labels = bare_features(self.model, self.train_data[t].eval_dataloader("train"))
            self._routers[t] = task_statistics(features, labels, self.tasks[t].num_labels)
        return self._routers[t]

    def release(self, j: int) -> None:
        """Remove task j's head from the model (it is reloaded from the library when needed)."""
        self.model.activate()
        if self.name(j) in self.model.heads:
            del self.model.heads[self.name(j)]

    # ---- per-method hooks ----------------------------------------------------------------------------------
    def module_kwargs(self, i: int) -> dict:
        raise NotImplementedError

    def write(self, i: int, metrics: dict) -> None:
        raise NotImplementedError

    def restore(self, i: int) -> None:
        """Bring the model to its state after finished task i (resume)."""

    def reset_backbone(self) -> None:
        """Bring the backbone back to its loaded weights (only full fine-tuning changes them)."""

    def select(self, j: int, i: int, live: bool) -> None:
        raise NotImplementedError


class IsolatedAdapters(SequenceMethod):
    isolated = True

    def module_kwargs(self, i: int) -> dict:
        adapter = self.ensure_adapter(self.name(i), self._seed(i, 2), fresh=True)
        head = self.ensure_head(i, fresh=True)
        return {"adapters": (adapter,), "train_adapters": (adapter,), "head": head}

    def write(self, i: int, metrics: dict) -> None:
        self.write_artefact("adapter", i, self.model.adapter_state(self.name(i)), metrics)
        if self.routed:  # class-incremental: predict --task auto reads the routers
            tensors, extra = self.trained_router(i) if self.config.router.kind == "trained" else ({}, {})
            self.write_artefact("router", i, {**self.router(i), **tensors}, metrics, extra)
        self.write_head(i, metrics)

    def task_router(self, seen: list[int], i: int):
        """What names each input's task among ``seen`` after task i: the router trained after task i where the
        run trains one and it knows every seen task (:mod:`.trained_router`), else LDA (:mod:`.router`; also the
        cells evaluated before a task trains: the baseline row and FWT's)."""
        entry = self.library.find("router", self.name(i)) if i >= 0 and seen[-1] <= i else None
        trained = stored_router(entry)
        if self.config.router.kind == "trained" and trained.get("kind") == "trained":
            tensors = self.library.load("router", self.name(i), self.fingerprint).tensors
            return TrainedRouter(self.model, tensors, trained["owners"], self.config.adapter, self.config.head)
        return LdaRouter(self.model, [self.router(t) for t in seen])

    def trained_router(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Train the router over every class of tasks 0..i on their kept training examples; its tensors and the
        config that names the owner task of each of its classes."""
        seen = range(i + 1)
        offsets = [sum(self.tasks[t].num_labels for t in range(k)) for k in seen]
        for t in seen:
            self.train_data[t].setup()
        examples = kept_examples([self.train_data[t].datasets["train"] for t in seen], offsets)
        owners = [t for t in seen for _ in range(self.tasks[t].num_labels)]
        started = time.perf_counter()
        tensors = train_router(
            self.model,
            examples,
            self.train_data[i].collator,
            len(owners),
            self.config.adapter,
            self.config.head,
            self.config.trainer,
            self.config.router,
            self._seed(i, 5),
        )
        config = {
            "kind": "trained",
            "owners": owners,
            "tasks": [self.name(t) for t in seen],
            "examples": len(examples),
            "epochs": self.config.router.epochs,
            "lr": self.config.router.learning_rate(self.config.trainer),
            "train_wall_time_s": round(time.perf_counter() - started, 3),
        }
        return tensors, {"router": config}

    @property
    def routed(self) -> bool:
        return self.config.setting == "class-incremental"

    def is_done(self, i: int) -> bool:
        entries = [self.library.find(kind, self.name(i)) for kind in ("adapter", "router")[: 1 + self.routed]]
        stored = all(e is not None and e["fingerprint"] == self.fingerprint for e in entries)
        router = stored_router(entries[-1]).get("kind", "lda") if self.routed else "lda"
        return super().is_done(i) and stored and router == self.config.router.kind

    def release(self, j: int) -> None:
        super().release(j)
        self.model.delete_adapter(self.name(j))

    def select(self, j: int, i: int, live: bool) -> None:
        name = self.name(j)
        if j <= i and not (live and j == i):
            self.ensure_adapter(name, self._seed(j, 2))
            self.model.load_adapter_state(name, self.library.load("adapter", name, self.fingerprint).tensors)
            head = self.load_head(j)
        else:
            self.ensure_adapter(name, self._seed(j, 2), fresh=not live)
            head = self.ensure_head(j, fresh=not live)
        self.model.activate([name], head=head)


class ReferenceAdapters(IsolatedAdapters):
    """Reference models for intransigence: a fresh adapter + head per task, trained on that task alone."""

    prefix = "ref@"


class SharedAdapter(SequenceMethod):
    prefix = "shared@"

    def module_kwargs(self, i: int) -> dict:
        if i == 0:
            self.ensure_adapter(SHARED, self._seed(0, 2), fresh=True)
        return {"adapters": (SHARED,), "train_adapters": (SHARED,), "head": self.ensure_head(i, fresh=True)}

    def write(self, i: int, metrics: dict) -> None:
        self.write_artefact("adapter", i, self.model.adapter_state(SHARED), metrics)
        self.write_head(i, metrics)

    def restore(self, i: int) -> None:
        self.ensure_adapter(SHARED, self._seed(0, 2))
        self.model.load_adapter_state(SHARED, self.library.load("adapter", self.name(i), self.fingerprint).tensors)

    def select(self, j: int, i: int, live: bool) -> None:
        if not live:
            if i < 0:
                self.ensure_adapter(SHARED, self._seed(0, 2), fresh=True)
            else:
                self.restore(i)
        head = self.load_head(j) if j < i or (j == i and not live) else self.ensure_head(j, fresh=not live)
        self.model.activate([SHARED], head=head)


class FullFinetune(SequenceMethod):
    prefix = "finetune@"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.original = {k: v.detach().clone() for k, v in self._backbone_state().items()}
        self.state_index = -1

    def _backbone_state(self) -> dict[str, torch.Tensor]:
        return {
            n: p for n, p in self.model.backbone.named_parameters() if ".adapters." not in n and ".fusions." not in n
        }

    def _checkpoint(self, i: int) -> Path:
        return self.checkpoint_dir / f"backbone@{self.tasks[i].name}.safetensors"

    def module_kwargs(self, i: int) -> dict:
        self.state_index = i
        return {"head": self.ensure_head(i, fresh=True), "train_backbone": True}

    def write(self, i: int, metrics: dict) -> None:
        atomic_write(
            self._checkpoint(i), save({k: v.detach().contiguous().cpu() for k, v in self._backbone_state().items()})
        )
        self.write_head(i, metrics)

    def is_done(self, i: int) -> bool:
        return super().is_done(i) and self._checkpoint(i).is_file()

    def restore(self, i: int) -> None:
        state = self.original if i < 0 else load_file(str(self._checkpoint(i)))
        with torch.no_grad():
            for name, param in self._backbone_state().items():
                param.copy_(state[name])
        self.state_index = i

    def reset_backbone(self) -> None:
        self.restore(-1)

    def select(self, j: int, i: int, live: bool) -> None:
        if not live and self.state_index != i:
            self.restore(i)
        head = self.load_head(j) if j < i or (j == i and not live) else self.ensure_head(j, fresh=not live)
        self.model.activate([], head=head)


METHOD_CLASSES = {"adapters": IsolatedAdapters, "shared-adapter": SharedAdapter, "full-finetune": FullFinetune}


def method_for(config: RunConfig, *args, **kwargs) -> SequenceMethod:
    """The SequenceMethod of ``config.method`` (a strategy: its base's, with the strategy attached)."""
    return METHOD_CLASSES[config.base_method](config, *args, **kwargs)
