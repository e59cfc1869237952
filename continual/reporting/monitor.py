"""The forgetting monitor: fills the accuracy matrix R by really re-evaluating every task.

``R[i][j]`` = task j's primary test metric (its type's ``score``: accuracy for classification, entity F1 for
tagging) after training task i; every other metric an evaluation returns fills a matrix of its own. At the
end of task i (``on_fit_end``, after the library writer stored the task's artefacts) the monitor evaluates
tasks 0..i with their artefacts loaded from the library, and task i+1 with its untrained initialisation (for
FWT). Before any training it evaluates every task untrained (b_j). Nothing is assumed: an isolated adapter's
BWT = 0.0 is a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

# evaluate(task j, after task i (-1: before any training), live) -> {"score", <metric>: value, ...};
# live=True evaluates the model as it is in the middle of training task i.
Evaluator = Callable[[int, int, bool], dict[str, float]]


class ForgettingMonitor(L.Callback):
    def __init__(self, task_names: list[str], evaluate: Evaluator, every_n_val_epochs: int = 0) -> None:
        self.task_names = list(task_names)
        self.evaluate = evaluate
        self.every_n_val_epochs = every_n_val_epochs
        t = len(task_names)
        self.matrix: list[list[float | None]] = [[None] * t for _ in range(t)]
        self.baseline: list[float | None] = [None] * t
        self.metrics: dict[str, list[list[float | None]]] = {}  # every named metric, as a matrix
        self.interim: list[dict] = []
        self.current: int | None = None

    def evaluate_baseline(self) -> None:
        for j in range(len(self.task_names)):
            self.baseline[j] = self.evaluate(j, -1, False)["score"]

    def evaluate_row(self, i: int) -> None:
        """Row i: every task seen so far, and the next one (untrained) for forward transfer."""
        for j in range(min(i + 2, len(self.task_names))):
            result = self.evaluate(j, i, False)
            self.matrix[i][j] = result["score"]
            for key in result.keys() - {"score"}:  # accuracy, macro_f1, entity_f1, ..., oracle_accuracy, ...
                t = len(self.task_names)
                self.metrics.setdefault(key, [[None] * t for _ in range(t)])[i][j] = result[key]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.current is not None:
            self.evaluate_row(self.current)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = self.every_n_val_epochs
        if n <= 0 or not self.current or trainer.sanity_checking or (trainer.current_epoch + 1) % n:
            return
        earlier = {self.task_names[j]: self.evaluate(j, self.current, True)["score"] for j in range(self.current)}
        pl_module.model.train()  # evaluation switched modules to eval mode; restore the training setup
        if hasattr(pl_module, "prepare"):
            pl_module.prepare()
        self.interim.append({"task": self.task_names[self.current], "epoch": trainer.current_epoch, "earlier": earlier})
