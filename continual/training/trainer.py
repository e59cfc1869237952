"""Building Lightning Trainers for one task and the callback that stores a finished task in the library."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from adafuse.continual.config import TrainerConfig, dump_yaml
from adafuse.continual.runtime.distributed import barrier, is_main, on_main
from adafuse.continual.training.module import NonFiniteLossError
from adafuse.fusion.storage import atomic_write

BEST_METRIC = "val_accuracy"


class StepSeed(L.Callback):
    """Seeds torch before every training batch from (seed, global step, place in the accumulated step): the
    dropout masks of a batch do not depend on what drew random numbers before it (a resumed run creates its
    data iterator, which draws a seed, at another point than an uninterrupted one; seeding per epoch let that
    shift every mask of the epoch), and the batches of one accumulated step draw different masks."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        place = batch_idx % trainer.accumulate_grad_batches  # 0 without accumulation: the seeds are unchanged
        torch.manual_seed(self.seed * 100_003 + trainer.global_step + 7_919 * place)


class LibraryWriter(L.Callback):
    """At the end of a task: reload the best checkpoint's trained tensors, then ``write(metrics)``.

    ``evaluate_test`` (optional) adds test metrics; the sequence runner leaves it out because the forgetting
    monitor evaluates the stored artefacts on the test set right after.
    """

    def __init__(
        self, write: Callable[[dict], None], evaluate_test: Callable[[], dict[str, float]] | None = None
    ) -> None:
        self.write = write
        self.evaluate_test = evaluate_test
        self.started = time.perf_counter()
        self.result: dict = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_trained_state(state)
        val = (
            float(checkpoint.best_model_score)
            if checkpoint is not None and checkpoint.best_model_score is not None
            else None
        )
        pl_module.prepare()
        self.result = {
            "val_accuracy": val,
            "epochs": trainer.current_epoch,
            "train_wall_time_s": round(time.perf_counter() - self.started, 3),
        }
        if self.evaluate_test is not None:
            self.result["test"] = {k: v for k, v in self.evaluate_test().items() if k != "score"}
        on_main(self.write, self.result)  # the other ranks wait until the artefacts are there to read


def make_trainer(
    config: TrainerConfig, out: Path, task: str, callbacks: list[L.Callback], seed: int, unused_parameters: bool = False
) -> L.Trainer:
    """The task's Trainer. ``unused_parameters``: some trainable parameters get no gradient in a step (DDP must
    look for them)."""
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints" / task,
        filename="best",
        monitor=BEST_METRIC,
        mode="max",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    if config.early_stopping_patience is not None:
        callbacks = [*callbacks, EarlyStopping(BEST_METRIC, mode="max", patience=config.early_stopping_patience)]
    optional = {"limit_train_batches": config.limit_train_batches} if config.limit_train_batches is not None else {}
    return L.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=lightning_strategy(config.strategy, unused_parameters),
        precision=config.precision,
        gradient_clip_val=config.gradient_clip_val,
        accumulate_grad_batches=config.accumulate_grad_batches,
        callbacks=[StepSeed(seed), *callbacks, checkpoint],
        plugins=[AtomicCheckpointIO()],
        logger=loggers(out, task),
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=config.val_every_n_epochs,
        deterministic=config.accelerator == "cpu",
        log_every_n_steps=10,
        **optional,
    )


def lightning_strategy(strategy: str, unused_parameters: bool):
    """Lightning's strategy for ``trainer.strategy`` (``fsdp``: DDP over a backbone the module shards)."""
    if strategy in ("ddp", "fsdp"):
        return DDPStrategy(find_unused_parameters=unused_parameters)
    return strategy


def loggers(out: Path, task: str) -> list:
    """CSV logs always; TensorBoard as well when it is installed."""
    chosen = [CSVLogger(out / "logs", name=task, version=0)]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        chosen.append(TensorBoardLogger(out / "logs", name=task, version=0))
    except ModuleNotFoundError:
        pass
    return chosen


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every other file here: complete or not at all, even under SIGKILL."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(Path(path), buffer.getvalue())


def fit(trainer: L.Trainer, module: L.LightningModule, data, out: Path, task: str, config) -> None:
    """``trainer.fit``, resumed from the task's ``last.ckpt`` if an interrupted fit left one for this config.

    Checkpoints are stamped with the job's config: those of another config are removed, not resumed, and
    so are those of a fit whose loss became NaN/inf (they hold the diverging run).
    """
    folder = out / "checkpoints" / task
    signature = hashlib.sha256(dump_yaml(config).encode()).hexdigest()
    stamp = folder / "config.sha256"
    if is_main():
        if folder.exists() and (not stamp.is_file() or stamp.read_text() != signature):
            shutil.rmtree(folder)
        atomic_write(stamp, signature.encode())
    barrier()
    last = folder / "last.ckpt"
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
        module.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU: evaluate where it trained
    except NonFiniteLossError:
        if is_main():
            shutil.rmtree(folder, ignore_errors=True)
        raise
