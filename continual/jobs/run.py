"""``adafuse run``: a task sequence end to end -> library, accuracy matrix, metrics, report.

For each task in order: (skip it if its artefacts are already in the library, verified) train with
Lightning, store the best weights in the library, and let the forgetting monitor evaluate every task
so far from the library. Re-running the same command on a killed run's folder resumes it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import lightning as L

from adafuse.continual.config import RunConfig, dump_yaml
from adafuse.continual.jobs.job import Environment, claimed_output, prepare_environment, trainable_count
from adafuse.continual.names import STRATEGY_METHODS
from adafuse.continual.reporting.metrics import summarize
from adafuse.continual.reporting.monitor import ForgettingMonitor
from adafuse.continual.reporting.report import write_results, write_run_report
from adafuse.continual.runtime.distributed import is_main, on_main
from adafuse.continual.training.methods import ReferenceAdapters, method_for
from adafuse.continual.training.module import AdapterTaskModule
from adafuse.continual.training.trainer import LibraryWriter, fit, make_trainer
from adafuse.fusion.errors import UserError
from adafuse.fusion.library import AdapterLibrary
from adafuse.fusion.storage import atomic_write
from adafuse.tasks.datamodule import TaskDataModule
from adafuse.tasks.resolve import resolve_sequence
from adafuse.tasks.types import task_type


def check_disjoint_labels(tasks) -> None:
    """Class-incremental: a label may belong to one task only (an input is classified among all of them)."""
    owner: dict[str, str] = {}
    for task in tasks:
        for label in task.label_names:
            if label in owner:
                raise UserError(
                    f"setting class-incremental: label '{label}' belongs to tasks '{owner[label]}' and '{task.name}'"
                    " (expected disjoint label sets)"
                )
            owner[label] = task.name


def check_task_types(config: RunConfig, tasks) -> None:
    """Class-incremental evaluation and the strategies (EWC's Fisher, LwF's distillation, replay's mixed
    batches) read one label per input: they take classification tasks only."""
    other = [t for t in tasks if t.type != "classification"]
    uses = "setting class-incremental" if config.setting == "class-incremental" else f"method {config.method}"
    if other and (config.setting == "class-incremental" or config.method in STRATEGY_METHODS):
        raise UserError(f"{uses}: task '{other[0].name}' is {other[0].type}; it takes classification tasks only")


def run_sequence(
    config: RunConfig, out: Path, library_dir: Path | None = None, base_dir: Path = Path("."), log=print
) -> dict:
    started = time.perf_counter()
    tasks = resolve_sequence(config.sequence, config.tasks, base_dir, None, config.max_length)  # checked before writing
    check_task_types(config, tasks)
    for task in tasks:
        task_type(task.type).check_padding(config.trainer.pad_to_multiple_of, task.name)
    if config.setting == "class-incremental":
        check_disjoint_labels(tasks)
    library_dir = Path(library_dir or Path(out) / "library")
    env = prepare_environment(config, tasks)
    for task in tasks:
        task_type(task.type).check_backbone(env.model.sites, task.name)
    AdapterLibrary(library_dir).check_backbone(env.fingerprint)  # before anything is written
    with claimed_output(Path(out), library_dir) as out:
        return _run(config, env, tasks, out, library_dir, log, started)


def _run(config: RunConfig, env: Environment, tasks, out: Path, library_dir: Path, log, started: float) -> dict:
    if is_main():
        atomic_write(out / "config.yaml", dump_yaml(config).encode())
    modules = [
        TaskDataModule(
            t,
            env.tokenizer,
            config.trainer.batch_size,
            config.trainer.eval_batch_size,
            config.trainer.num_workers,
            config.seed + i,
            out / "cache",
            config.trainer.pad_to_multiple_of,
        )
        for i, t in enumerate(tasks)
    ]
    library = AdapterLibrary(library_dir)
    method = method_for(
        config,
        env.model,
        library,
        env.fingerprint,
        tasks,
        [m.eval_dataloader("test") for m in modules],
        out / "checkpoints",
        train_data=modules,
    )
    monitor = ForgettingMonitor([t.name for t in tasks], method.evaluate, config.monitor.every_n_val_epochs)
    log(f"adafuse run: {len(tasks)} tasks, method {config.method}, evaluating the untrained model")
    monitor.evaluate_baseline()
    per_task = {}
    for i, (task, data) in enumerate(zip(tasks, modules, strict=True)):
        monitor.current = i
        if method.is_done(i):
            entry = library.get("head", method.name(i))
            method.resume(i)
            monitor.evaluate_row(i)
            record_test_accuracy(config, library, method.name(i), monitor.metrics, i)
            per_task[task.name] = {**entry["metrics"], "reused": True}
            log(f"[{i + 1}/{len(tasks)}] {task.name}: found in the library, not retrained")
            continue
        if i > 0:
            method.release(i - 1)  # the finished task's modules leave the model; the library has them
        log(f"[{i + 1}/{len(tasks)}] {task.name}: training ({task.sizes()['train']} examples)")
        L.seed_everything(config.seed + i, workers=True, verbose=False)
        module = AdapterTaskModule(
            env.model,
            num_labels=task.num_labels,
            trainer_config=config.trainer,
            strategy=method.strategy,
            task_type=task.type,
            **method.module_kwargs(i),
        )
        method.before_task(i)
        trainable = trainable_count(env.model)
        counts = {"trainable_params": trainable, "trainable_pct": round(100.0 * trainable / env.backbone_params, 4)}
        writer = LibraryWriter(lambda m, i=i, counts=counts: method.finish(i, {**m, **counts}))
        trainer = make_trainer(config.trainer, out, task.name, [writer, monitor], config.seed + i)
        fit(trainer, module, data, out, task.name, config)
        record_test_accuracy(config, library, method.name(i), monitor.metrics, i)
        per_task[task.name] = {**writer.result, **counts}
        log(
            f"[{i + 1}/{len(tasks)}] {task.name}: test {task_type(task.type).primary} {monitor.matrix[i][i]:.4f} "
            f"(validation accuracy {writer.result['val_accuracy']:.4f})"
        )
    reference = None
    if config.monitor.reference:
        method.reset_backbone()
        reference = _reference_accuracies(config, env, tasks, modules, out, log)
    metrics = _metrics(config, tasks, monitor, per_task, env, time.perf_counter() - started, reference)
    metrics["strategy"] = method.strategy.summary()
    for key, matrix in monitor.metrics.items():  # macro_f1, entity_f1, ..., oracle_accuracy, task_id_accuracy
        if key == "accuracy":  # accuracy_matrix holds every task's primary metric (classification: accuracy)
            continue
        metrics[f"{key}_matrix"] = matrix
        final = [value for value in matrix[-1] if value is not None]  # a mixed-type sequence: the tasks with it
        metrics[f"final_{key}"] = sum(final) / len(final)
    on_main(write_results, out, metrics, write_run_report)
    return metrics


def _reference_accuracies(config: RunConfig, env: Environment, tasks, modules, out: Path, log) -> list[float]:
    """a*_j: test accuracy of a fresh adapter + head trained on task j alone (for intransigence)."""
    reference = ReferenceAdapters(
        replace(config, method="adapters", setting="task-incremental"),
        env.model,
        AdapterLibrary(out / "reference"),
        env.fingerprint,
        tasks,
        [m.eval_dataloader("test") for m in modules],
        out / "checkpoints",
    )
    accuracies = []
    for i, (task, data) in enumerate(zip(tasks, modules, strict=True)):
        if not reference.is_done(i):
            log(f"[reference {i + 1}/{len(tasks)}] {task.name}: training on this task alone")
            L.seed_everything(config.seed + i, workers=True, verbose=False)
            module = AdapterTaskModule(
                env.model,
                num_labels=task.num_labels,
                trainer_config=config.trainer,
                task_type=task.type,
                **reference.module_kwargs(i),
            )
            writer = LibraryWriter(lambda m, i=i: reference.write(i, m))
            trainer = make_trainer(config.trainer, out, reference.name(i), [writer], config.seed + i)
            fit(trainer, module, data, out, reference.name(i), config)
        accuracies.append(reference.evaluate(i, i)["score"])
    return accuracies


def record_test_accuracy(config: RunConfig, library: AdapterLibrary, name: str, metrics: dict, i: int) -> None:
    """Keep task i's test accuracy, as the monitor measured it right after training, in its adapter's library
    entry (with the head's sha256 and the evaluation settings it holds for): ``fuse`` then compares its sources
    after training against this record instead of evaluating them twice. Task-incremental runs only (a
    class-incremental score is not the score of the adapter and its head alone)."""
    accuracy = metrics["accuracy"][i][i] if "accuracy" in metrics else None
    if config.setting != "task-incremental" or accuracy is None or not is_main():
        return
    entries = {(e["kind"], e["name"]): e for e in library.entries()}
    adapter, head = entries.get(("adapter", name)), entries.get(("head", name))
    if adapter is None or head is None:
        return
    record = {
        "accuracy": accuracy,
        "head_sha256": head["sha256"],
        "max_length": config.max_length,
        "eval_batch_size": config.trainer.eval_batch_size,
    }
    if adapter["metrics"].get("test") != record:
        library.record_metrics("adapter", name, {"test": record})


def _metrics(
    config: RunConfig,
    tasks,
    monitor: ForgettingMonitor,
    per_task: dict,
    env: Environment,
    wall: float,
    reference: list[float] | None,
):
    names = [t.name for t in tasks]
    for j, name in enumerate(names):
        per_task[name].update(
            {
                **{f"final_{key}": matrix[-1][j] for key, matrix in monitor.metrics.items()},
                "metric": task_type(tasks[j].type).primary,  # what final_accuracy and the matrix hold
                "final_accuracy": monitor.matrix[-1][j],
                "accuracy_after_training": monitor.matrix[j][j],
                "baseline_accuracy": monitor.baseline[j],
            }
        )
    return {
        "method": config.method,
        "setting": config.setting,
        "adapter_kind": config.adapter.kind,
        "router": config.router.kind if config.setting == "class-incremental" and config.method == "adapters" else None,
        **_router_training(config),
        "tasks": names,
        "accuracy_matrix": monitor.matrix,
        "baseline_accuracy": monitor.baseline,
        "reference_accuracy": reference,
        **summarize(monitor.matrix, monitor.baseline, reference),
        "per_task": per_task,
        "interim": monitor.interim,
        "backbone": {"name": config.backbone.name, "fingerprint": env.fingerprint, "params": env.backbone_params},
        "seed": config.seed,
        "wall_time_s": round(wall, 3),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "lightning", "adafuse")}


def _router_training(config: RunConfig) -> dict:
    """How a trained router was trained (``router_training``: epochs, lr); nothing for the other routers."""
    if config.router.kind != "trained":
        return {}
    return {"router_training": {"epochs": config.router.epochs, "lr": config.router.learning_rate(config.trainer)}}
