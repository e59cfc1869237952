"""Experience replay from a fixed memory (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual
Learning"): after task t, a class-balanced sample of its training examples joins the memory; while a later
task trains, every batch is mixed with examples drawn from the memory, each through its own task's (frozen)
head, and the loss is the mean over all rows of the mixed batch:

    L = (B L_new + R L_memory) / (B + R)        R = round(replay_ratio · B) replayed rows per batch

The memory is the finished tasks' own training examples (the user's data, tokenised): the run stores which
ones (their indices in each task's training split) in its checkpoint folder and in ``metrics.json``, and
reads them from the splits again when a later task starts (also after a resume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adafuse.continual.strategies import Strategy

_TOKENS = ("input_ids", "attention_mask", "token_type_ids")


def class_balanced_sample(labels: list[int], k: int, seed: int) -> list[int]:
    """``k`` indices (or all) drawn round-robin over the classes, each class in a seeded random order: the
    classes are as equally represented as their sizes allow."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).tolist()
    by_class: dict[int, list[int]] = {}
    for index in order:
        by_class.setdefault(labels[index], []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    while len(chosen) < min(k, len(labels)):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    return chosen


def slots_per_task(tasks: int, per_task: int, budget: int | None) -> int:
    """How many examples each of ``tasks`` finished tasks keeps: ``per_task``, or an even share of ``budget``."""
    return per_task if budget is None else max(1, budget // tasks)


class Replay(Strategy):
    stateful = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.pool: list[tuple[int, dict]] = []  # (task index, kept example) read from its training split, by task
        self.indices: dict[int, list[int]] = {}  # task index -> the kept examples' indices in its training split
        self.collate = None

    def before_task(self, i: int, method, data) -> None:
        self.keep_heads(method, range(i))
        self.collate = data.collator
        self.pool = [(j, self._example(method, j, k)) for j, chosen in sorted(self.indices.items()) for k in chosen]
        self.replayed = max(1, round(self.config.replay_ratio * method.config.trainer.batch_size))
        self.seed = self.task_seed(method, i)

    def loss(self, model, batch, hidden, task_loss, step):
        if not self.pool:
            return task_loss
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        drawn = [self.pool[k] for k in torch.randint(len(self.pool), (self.replayed,), generator=generator).tolist()]
        replay = {k: v.to(hidden.device) for k, v in self.collate([example for _, example in drawn]).items()}
        labels = replay.pop("labels")
        replay_hidden = model.encode(**replay)
        tasks = torch.tensor([j for j, _ in drawn])
        total = task_loss * len(hidden)
        for j in tasks.unique().tolist():
            rows = (tasks == j).nonzero().squeeze(1).to(hidden.device)
            logits = self.old_heads[str(j)](replay_hidden[rows], replay["attention_mask"][rows])
            total = total + F.cross_entropy(logits.float(), labels[rows], reduction="sum")
        return total / (len(hidden) + len(drawn))

    def after_task(self, i: int, method, data) -> None:
        data.setup()
        train = data.datasets["train"]
        keep = slots_per_task(i + 1, self.config.replay_per_task, self.config.replay_budget)
        self.indices = {j: chosen[:keep] for j, chosen in self.indices.items()}  # a budget shrinks older tasks
        self.indices[i] = class_balanced_sample(train["labels"], keep, self.task_seed(method, i))

    @staticmethod
    def _example(method, j: int, k: int) -> dict:
        example = method.train_data[j].datasets["train"][k]
        return {key: example[key] for key in (*_TOKENS, "labels") if key in example}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"indices/{j}": torch.tensor(chosen, dtype=torch.int64) for j, chosen in self.indices.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.indices = {int(k.removeprefix("indices/")): v.tolist() for k, v in state.items()}

    def summary(self) -> dict:
        return {
            "replay_ratio": self.config.replay_ratio,
            "extra_memory": f"{sum(len(c) for c in self.indices.values()):,} examples",
            "replay_memory": {str(j): len(chosen) for j, chosen in self.indices.items()},
            "replay_indices": {str(j): chosen for j, chosen in self.indices.items()},
        }
