"""The forgetting monitor: fills the accuracy matrix R by really re-evaluating every task.

``R[i][j]`` = test accuracy on task j after training task i. At the end of task i (``on_fit_end``,
after the library writer stored the task's artefacts) the monitor evaluates tasks 0..i with their
artefacts loaded from the library, and task i+1 with its untrained initialisation (for FWT). Before
any training it evaluates every task untrained (b_j). Nothing is assumed: an isolated adapter's
BWT = 0.0 is a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

# evaluate(task j, after task i (-1: before any training), live) -> {"accuracy", "macro_f1"};
# live=True evaluates the model as it is in the middle of training task i.
Evaluator = Callable[[int, int, bool], dict[str, float]]


class ForgettingMonitor(L.Callback):
    def __init__(self, task_names: list[str], evaluate: Evaluator, every_n_val_epochs: int = 0) -> None:
        self.task_names = list(task_names)
        self.evaluate = evaluate
        self.every_n_val_epochs = every_n_val_epochs
        t = len(task_names)
        self.matrix: list[list[float | None]] = [[None] * t for _ in range(t)]
        self.f1_matrix: list[list[float | None]] = [[None] * t for _ in range(t)]
        self.baseline: list[float | None] = [None] * t
        self.extra: dict[str, list[list[float | None]]] = {}  # other scores an evaluation returns, as matrices
        self.interim: list[dict] = []
        self.current: int | None = None

    def evaluate_baseline(self) -> None:
        for j in range(len(self.task_names)):
            self.baseline[j] = self.evaluate(j, -1, False)["accuracy"]

    def evaluate_row(self, i: int) -> None:
        """Row i: every task seen so far, and the next one (untrained) for forward transfer."""
        for j in range(min(i + 2, len(self.task_names))):
            result = self.evaluate(j, i, False)
            self.matrix[i][j] = result["accuracy"]
            self.f1_matrix[i][j] = result["macro_f1"]
            for key in result.keys() - {"accuracy", "macro_f1"}:  # class-incremental: oracle, task identification
                t = len(self.task_names)
                self.extra.setdefault(key, [[None] * t for _ in range(t)])[i][j] = result[key]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.current is not None:
            self.evaluate_row(self.current)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = self.every_n_val_epochs
        if n <= 0 or not self.current or trainer.sanity_checking or (trainer.current_epoch + 1) % n:
            return
        earlier = {self.task_names[j]: self.evaluate(j, self.current, True)["accuracy"] for j in range(self.current)}
        pl_module.model.train()  # evaluation switched modules to eval mode; restore the training setup
        if hasattr(pl_module, "prepare"):
            pl_module.prepare()
        self.interim.append({"task": self.task_names[self.current], "epoch": trainer.current_epoch, "earlier": earlier})
