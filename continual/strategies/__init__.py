"""Continual-learning strategies on one shared trainable set (a shared adapter, or the whole backbone), each a
``method`` of ``adafuse run``:

* ``ewc`` — Elastic Weight Consolidation (Kirkpatrick et al. 2017), online (Schwarz et al. 2018):
  :mod:`.ewc`.
* ``lwf`` — Learning without Forgetting (Li & Hoiem 2017): :mod:`.lwf`.
* ``replay`` — experience replay from a fixed, class-balanced memory: :mod:`.replay`.

A strategy is an ``nn.Module`` of hooks (so Lightning moves its tensors with the model): ``before_task``
(before task i trains), ``loss`` (the training objective from the task's loss), ``after_task`` (once task i's
best weights are back) and ``state``/``load_state`` (saved atomically beside the run's checkpoints, so a
killed run resumes with it). The earlier tasks' heads a strategy needs are frozen copies it holds itself; they
do not train (the library keeps each task's head as it finished). :class:`Strategy` itself does nothing: the
isolated adapters and the naive baselines run through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from adafuse.fusion.errors import UserError

BASES = ("shared-adapter", "full-finetune")


@dataclass
class StrategyConfig:
    """Settings of ``method: ewc | lwf | replay``.

    Attributes:
        base: the shared trainable set the strategy regularises: ``shared-adapter`` (one adapter through all
            tasks, the parameter-efficient setting) or ``full-finetune`` (the backbone).
        ewc_lambda: EWC's λ in λ/2 Σ F (θ − θ*)².
        ewc_gamma: online EWC's decay of the earlier tasks' Fisher (F ← γ F + F_new); 1.0 sums them.
        fisher_samples: training examples of a task whose per-example gradients give its diagonal Fisher.
        lwf_alpha: LwF's weight λ_o of the distillation loss per earlier task.
        lwf_temperature: LwF's temperature T (Li & Hoiem use 2).
        replay_per_task: examples kept per finished task (class-balanced), unless ``replay_budget`` is set.
        replay_budget: a fixed total memory shared evenly by the finished tasks (older tasks shrink).
        replay_ratio: replayed examples per training batch, as a share of the batch size (rounded, >= 1).
    """

    base: str = "shared-adapter"
    ewc_lambda: float = 1000.0
    ewc_gamma: float = 1.0
    fisher_samples: int = 200
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    replay_per_task: int = 50
    replay_budget: int | None = None
    replay_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise UserError(f"strategy.base: '{self.base}' is not one of {', '.join(BASES)}")
        positive = ("ewc_lambda", "fisher_samples", "lwf_temperature", "replay_per_task", "replay_ratio")
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"strategy.{key}: {getattr(self, key)} must be > 0")
        if not 0 <= self.ewc_gamma <= 1:
            raise UserError(f"strategy.ewc_gamma: {self.ewc_gamma} is out of range (expected in [0, 1])")
        if self.lwf_alpha < 0:
            raise UserError(f"strategy.lwf_alpha: {self.lwf_alpha} must be >= 0")
        if self.replay_budget is not None and self.replay_budget < 1:
            raise UserError(f"strategy.replay_budget: {self.replay_budget} must be >= 1")


class Strategy(nn.Module):
    """No strategy: the task's own loss, nothing kept between tasks."""

    stateful = False  # whether state() must be saved after every task (and a task is done only with it)

    def __init__(self, config: StrategyConfig | None = None) -> None:
        super().__init__()
        self.config = config or StrategyConfig()
        self.old_heads = (
            nn.ModuleDict()
        )  # task index -> a frozen copy of the finished tasks' heads, where a strategy needs them

    def before_task(self, i: int, method, data) -> None:
        """Called before task i trains; ``method`` is the run's SequenceMethod, ``data`` task i's DataModule."""

    def loss(self, model, batch: dict[str, torch.Tensor], hidden: torch.Tensor, task_loss: torch.Tensor, step: int):
        """The training objective of training step ``step`` (the trainer's global step, so that a resumed run
        draws what an uninterrupted one draws), given the batch's (B, L, d) hidden states and the task's loss."""
        return task_loss

    def after_task(self, i: int, method, data) -> None:
        """Called once task i's best weights are back in the model, before its artefacts are stored."""

    def state(self) -> dict[str, torch.Tensor]:
        """What must survive the task (saved atomically with the checkpoints)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Bring the strategy to its state after a finished task (resume)."""

    def summary(self) -> dict:
        """What the run records about the strategy (memory sizes and contents, ...)."""
        return {}

    @staticmethod
    def task_seed(method, i: int) -> int:
        """The seed of what a strategy draws for task i (memory samples, Fisher examples, replay draws)."""
        return method.config.seed * 1_000_003 + i

    def keep_heads(self, method, tasks: range) -> None:
        """Frozen copies of the finished ``tasks``' heads, as the library holds them."""
        self.old_heads = nn.ModuleDict({str(j): method.frozen_head(j) for j in tasks}).to(method.model.device)


def strategy_for(method: str, config: StrategyConfig) -> Strategy:
    from adafuse.continual.strategies.ewc import EWC
    from adafuse.continual.strategies.lwf import LwF
    from adafuse.continual.strategies.replay import Replay

    return {"ewc": EWC, "lwf": LwF, "replay": Replay}.get(method, Strategy)(config)
