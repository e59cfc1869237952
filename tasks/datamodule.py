"""``TaskDataModule``: one task's tokenised splits as Lightning dataloaders with dynamic padding (the task type
encodes and collates): each batch padded to its longest example, or up to a multiple of ``pad_to_multiple_of``
so that a few shapes cover a run (compiled graphs are reused). The last partial batch keeps its size: dropping
it would change which examples train, padding it with rows would change the metrics' counts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from adafuse.tasks.spec import SPLITS, TaskData
from adafuse.tasks.types import task_type


class EpochSeededSampler(Sampler[int]):
    """A shuffle whose order depends only on (seed, epoch): a run resumed at epoch e sees the same order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class TaskDataModule(L.LightningDataModule):
    def __init__(
        self,
        task: TaskData,
        tokenizer,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: Path | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.type = task_type(task.type)
        self.collator = self.type.collator(tokenizer, pad_to_multiple_of)
        self.datasets: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = {
                split: self.type.encode(self.task.splits[split], self.tokenizer, self.task.max_length, self.cache_dir)
                for split in SPLITS
            }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed) if shuffle else None,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def eval_dataloader(self, split: str = "test") -> DataLoader:
        return self._loader(split, shuffle=False)
