"""``adafuse fuse``: AdapterFusion over frozen library adapters for a target task (Pfeiffer et al. 2021).

Loads the K source adapters (sha256 and backbone fingerprint checked), adds a fusion layer per block and
a new head, trains only those, stores fusion + head in the library with the sources' sha256, and
re-evaluates every source task before and after (their accuracies must not move). ``baseline=
"single-adapter"`` trains a fresh adapter + head on the same data and budget instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save

from adafuse.continual.config import FuseConfig, dump_yaml
from adafuse.continual.jobs.job import (
    claimed_output,
    prepare_environment,
    seeded_adapter_state,
    seeded_head_state,
    trainable_count,
)
from adafuse.continual.jobs.library_model import add_library_head
from adafuse.continual.jobs.rank import check_rankable, rank_library
from adafuse.continual.reporting.report import write_fusion_report, write_results
from adafuse.continual.runtime.distributed import is_main, on_main
from adafuse.continual.training.evaluate import evaluate
from adafuse.continual.training.module import AdapterTaskModule, FusionModule
from adafuse.continual.training.search import search_weights
from adafuse.continual.training.trainer import LibraryWriter, fit, make_trainer
from adafuse.fusion.attention import COMPOSITIONS
from adafuse.fusion.compiling import without_grad
from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import AdapterLibrary, check_name
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.storage import atomic_write, sha256_file
from adafuse.tasks.builtin import is_builtin, load_builtin
from adafuse.tasks.datamodule import TaskDataModule
from adafuse.tasks.resolve import resolve_task
from adafuse.tasks.spec import TaskSpec
from adafuse.tasks.types import task_type


def _target(config: FuseConfig) -> TaskSpec:
    spec = (
        TaskSpec(name=config.target, max_length=config.max_length) if isinstance(config.target, str) else config.target
    )
    if config.shots is not None:
        spec.shots = config.shots
    return spec


def _source_entries(
    library: AdapterLibrary, sources: list[str] | str | dict, composition: str = "attention"
) -> list[dict]:
    """The named sources, or every adapter the composition can take ('all', and the candidates of {auto: K})."""
    if sources == "all" or isinstance(sources, dict):  # slot kinds for attention, LoRA for weighted
        acts = COMPOSITIONS[composition]
        entries = [
            e for e in library.entries("adapter") if AdapterConfig(**e["config"].get("adapter", {})).acts == acts
        ]
        if not entries:
            what = "adapters to fuse" if acts == "slot" else "LoRA adapters to compose"
            raise UserError(f"library '{library.root}' holds no {what}")
        return entries
    if isinstance(sources, str) or not sources:
        raise UserError(f"sources: expected 'all' or a non-empty list of adapter names, found {sources!r}")
    return [library.get("adapter", name) for name in sources]


def _sources(count: int) -> str:
    """``1 source``, ``5 sources``."""
    return f"{count} source" + ("" if count == 1 else "s")


def choose_sources(env, library, entries, config: FuseConfig, target, log) -> tuple[list[dict], dict | None]:
    """``sources: {auto: K}``: rank ``entries`` (:mod:`.ranking`) and keep the best K, best first; the others
    leave the model. Named sources come back as they are, with no ranking."""
    if not isinstance(config.sources, dict):
        return entries, None
    ranking = rank_library(env, library, entries, target, config, log)
    chosen = [row["name"] for row in ranking["sources"] if row["chosen"]]
    for entry in entries:
        if entry["name"] not in chosen:
            env.model.delete_adapter(entry["name"])
    log(f"sources by {config.ranking.proxy} ({ranking['wall_time_s']:.1f} s): {', '.join(chosen)}")
    by_name = {e["name"]: e for e in entries}
    return [by_name[name] for name in chosen], ranking


def rank_for_config(config: FuseConfig, library_dir: Path, base_dir: Path = Path("."), log=print) -> dict:
    """``adafuse library rank``: the ranking ``sources: {auto: K}`` would make, without training anything."""
    library = AdapterLibrary(library_dir)
    if not library.exists():
        raise UserError(f"'{library_dir}' is not an adapter library (no manifest.json)")
    entries = _source_entries(library, "all", config.fusion.composition)
    target = resolve_task(_target(config), base_dir, None, config.max_length)
    env = prepare_environment(config, [target])
    library.check_backbone(env.fingerprint)
    return rank_library(env, library, entries, target, config, log)


def run_fusion(
    config: FuseConfig, library_dir: Path, out: Path, baseline: str | None = None, base_dir: Path = Path("."), log=print
) -> dict:
    started = time.perf_counter()
    library = AdapterLibrary(library_dir)
    if not library.exists():
        raise UserError(f"'{library_dir}' is not an adapter library (no manifest.json)")
    entries = _source_entries(library, config.sources, config.fusion.composition) if baseline is None else []
    spec = _target(config)
    target = resolve_task(spec, base_dir, None, config.max_length)
    fusion_name = check_name(config.name or f"{target.name}-fusion")
    env = prepare_environment(config, [target])
    task_type(target.type).check_backbone(env.model.sites, target.name)
    task_type(target.type).check_padding(config.trainer.pad_to_multiple_of, target.name)
    library.check_backbone(env.fingerprint)  # before anything is written
    if isinstance(config.sources, dict):
        check_rankable(target)
    with claimed_output(Path(out), Path(library_dir)) as out:
        if is_main():
            atomic_write(out / "config.yaml", dump_yaml(config).encode())
        model = env.model
        entries, ranking = choose_sources(env, library, entries, config, target, log)
        sources = [e["name"] for e in entries]
        hashes_before = {e["name"]: sha256_file(library.resolve(e["file"])) for e in entries}
        for entry in entries:
            if entry["name"] not in model.adapter_configs:  # ranked sources are loaded already
                model.add_adapter(entry["name"], AdapterConfig(**entry["config"].get("adapter", {})))
                model.load_adapter_state(entry["name"], library.load("adapter", entry["name"], env.fingerprint).tensors)
        source_eval = SourceEvaluator(model, library, entries if config.check_sources else [], env, config)
        recorded = source_eval.recorded()
        unrecorded = [name for name, accuracy in recorded.items() if accuracy is None]
        unscored = f"; evaluating {_sources(len(unrecorded))} without a recorded score" if unrecorded else ""
        log(f"adafuse fuse: {_sources(len(sources))}, target {target.name}{unscored}")
        measured = source_eval.run(unrecorded)
        before = {name: measured[name] if accuracy is None else accuracy for name, accuracy in recorded.items()}

        data = TaskDataModule(
            target,
            env.tokenizer,
            config.trainer.batch_size,
            config.trainer.eval_batch_size,
            config.trainer.num_workers,
            config.seed,
            out / "cache",
            config.trainer.pad_to_multiple_of,
        )
        head = fusion_name if baseline is None else f"{target.name}-single"
        head_type = task_type(target.type).head_for(model.sites)
        model.add_head(head, target.num_labels, config.head.pooling, config.head.dropout, head_type)
        model.load_head_state(head, seeded_head_state(model, target, config.head, config.seed * 31 + 1))
        if baseline is None:
            model.add_fusion(fusion_name, sources, config.fusion)
            searched = config.fusion.composition == "weighted" and config.fusion.search == "es"
            if searched:  # gradient-free weights first (LoraHub), then the head by gradient with them frozen
                log(f"searching the weights of {len(sources)} LoRA sources (evolution strategy, training split)")
                search_weights(model, fusion_name, head, data.eval_dataloader("train"), seed=config.seed, log=log)
            module = FusionModule(
                model,
                head=head,
                num_labels=target.num_labels,
                trainer_config=config.trainer,
                fusion=fusion_name,
                train_fusion=not searched,
                task_type=target.type,
            )
        else:
            model.add_adapter(head, config.adapter)
            model.load_adapter_state(head, seeded_adapter_state(model, config, config.seed * 31 + 2))
            module = AdapterTaskModule(
                model,
                head=head,
                num_labels=target.num_labels,
                trainer_config=config.trainer,
                adapters=(head,),
                train_adapters=(head,),
                task_type=target.type,
            )
        trainable = trainable_count(model)

        def write(metrics: dict) -> None:
            if baseline is None:
                _write_fusion(library, model, fusion_name, head, entries, env.fingerprint, config, target, metrics)
            else:
                tensors = {f"adapter.{k}": v for k, v in model.adapter_state(head).items()}
                tensors |= {f"head.{k}": v for k, v in model.head_state(head).items()}
                atomic_write(
                    out / "baseline_adapter.safetensors", save({k: v.contiguous() for k, v in tensors.items()})
                )

        scored = (None, target.type, target.label_names)  # evaluate(): device, task type, label names
        writer = LibraryWriter(write, lambda: evaluate(model, data.eval_dataloader("test"), *scored))
        # the fusion's key bias adds the same score to every source, so the fast path never reads it
        trainer = make_trainer(config.trainer, out, head, [writer], config.seed, unused_parameters=baseline is None)
        log(f"training {'fusion' if baseline is None else 'a single adapter'} on {target.sizes()['train']} examples")
        fit(trainer, module, data, out, head, config)
        module.prepare()
        validation = evaluate(model, data.eval_dataloader("validation"), *scored)
        validation.pop("score")
        attention = fusion_attention(model, data.eval_dataloader("test")) if baseline is None else None
        after = source_eval.run()
        hashes_after = {e["name"]: sha256_file(library.resolve(e["file"])) for e in entries}
        metrics = {
            "method": "fusion" if baseline is None else "single-adapter",
            "target": target.name,
            "sources": sources,
            "fusion": fusion_name if baseline is None else None,
            "metric": task_type(target.type).primary,
            "test": writer.result["test"],
            "validation": validation,
            "source_accuracy_recorded": recorded,
            "source_accuracy_before": before,
            "source_accuracy_after": after,
            "source_files_unchanged": hashes_before == hashes_after,
            "trainable_params": trainable,
            "epochs": writer.result["epochs"],
            "train_wall_time_s": writer.result["train_wall_time_s"],
            "wall_time_s": round(time.perf_counter() - started, 3),
            "ranking": ranking,
            "attention": attention,
            "composition_weights": composition_weights(model, fusion_name) if baseline is None else None,
            "label_names": target.label_names,
            "lr": config.trainer.lr,
            "head_lr": config.trainer.head_lr or config.trainer.lr,
            "seed": config.seed,
        }
        on_main(write_results, out, metrics, write_fusion_report)
        return metrics


def _write_fusion(
    library,
    model: AdaptedModel,
    name: str,
    head: str,
    entries: list[dict],
    fingerprint: str,
    config: FuseConfig,
    target,
    metrics: dict,
) -> None:
    sources = [{"name": e["name"], "sha256": e["sha256"]} for e in entries]
    entry_config = {
        "fusion": asdict(config.fusion),
        "label_names": target.label_names,
        "num_labels": target.num_labels,
        "head": {**asdict(config.head), "type": task_type(target.type).head_for(model.sites)},
        "task_type": target.type,
        "method": "fusion",
    }
    for kind, artefact, tensors, extra in (
        ("fusion", name, model.fusion_state(name), {"sources": sources}),
        ("head", head, model.head_state(head), {}),
    ):
        library.add(
            kind,
            artefact,
            tensors,
            fingerprint=fingerprint,
            config=entry_config,
            task=target.name,
            metrics=metrics,
            backbone=asdict(config.backbone),
            **extra,
        )


class SourceEvaluator:
    """Test accuracy of each source task (built-in tasks; others are reported as None) with its own head."""

    def __init__(self, model: AdaptedModel, library: AdapterLibrary, entries: list[dict], env, config) -> None:
        self.model = model
        self.library = library
        self.entries = entries
        self.env = env
        self.config = config
        self.loaders = {}
        for entry in entries:
            head = library.find("head", entry["name"])
            if head is not None and entry.get("task") and is_builtin(entry["task"]):
                task = load_builtin(entry["task"], max_length=config.max_length)
                if task.label_names == head["config"].get("label_names"):
                    module = TaskDataModule(task, env.tokenizer, eval_batch_size=config.trainer.eval_batch_size)
                    self.loaders[entry["name"]] = module.eval_dataloader("test")

    def recorded(self) -> dict[str, float | None]:
        """Each source's test accuracy as the library recorded it when the source was trained (``adafuse run``
        keeps the monitor's score in the adapter's entry), where it holds for what this job would measure: the
        same head (sha256; the adapter's own is checked on load) and the same evaluation settings."""
        results = {}
        heads = {e["name"]: e for e in self.library.entries("head")}
        for entry in self.entries:
            record = entry.get("metrics", {}).get("test") or {}
            head = heads.get(entry["name"])
            holds = (
                entry["name"] in self.loaders
                and head is not None
                and record.get("head_sha256") == head["sha256"]
                and record.get("max_length") == self.config.max_length
                and record.get("eval_batch_size") == self.config.trainer.eval_batch_size
            )
            results[entry["name"]] = record.get("accuracy") if holds else None
        return results

    def run(self, names: list[str] | None = None) -> dict[str, float | None]:
        """Test accuracy of the sources ``names`` (default: all), each with its own head from the library."""
        results = {e["name"]: None for e in self.entries}
        for name, loader in self.loaders.items():
            if names is not None and name not in names:
                continue
            head_name = f"source@{name}"
            add_library_head(self.model, self.library, self.env.fingerprint, name, head_name)
            self.model.activate([name], head=head_name)
            results[name] = evaluate(self.model, loader)["accuracy"]
        return results


def composition_weights(model: AdaptedModel, name: str) -> dict[str, float] | None:
    """A weighted composition's learned weight per source (None for an attention fusion)."""
    slot = next(slot for _, _, slot in model.slots() if name in slot.fusions)
    weights = getattr(slot.fusions[name], "weights", None)
    return None if weights is None else dict(zip(model.fusion_sources[name], weights.tolist(), strict=True))


@torch.no_grad()
def fusion_attention(model: AdaptedModel, loader) -> list[list[float]]:
    """Mean fusion attention weight per (layer, location) x source over the real tokens of ``loader``."""
    slots = [slot for _, _, slot in model.slots() if slot.active_fusion is not None]
    totals = [None] * len(slots)
    tokens = 0.0
    model.eval()
    for batch in loader:
        for slot in slots:
            slot.attention_recorder = []
        inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}  # batches move, not the model
        with without_grad(model):
            model(**inputs)
        # a site the task does not run records nothing (T5's decoder when classifying)
        recorded = [(index, slot.attention_recorder[0]) for index, slot in enumerate(slots) if slot.attention_recorder]
        mask = inputs.get("attention_mask")  # images: every patch is real
        real = (torch.ones(recorded[0][1].shape[:2]) if mask is None else mask).float()  # (B, L)
        tokens += float(real.sum())
        for index, weights in recorded:  # (B, L, K)
            summed = (weights * real.unsqueeze(-1).to(weights.device)).sum((0, 1))
            totals[index] = summed if totals[index] is None else totals[index] + summed
    for slot in slots:
        slot.attention_recorder = None
    return [(t / tokens).tolist() for t in totals if t is not None]
