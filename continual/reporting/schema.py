"""The fields of ``metrics.json``, documented once: the docs' reference page is generated from these tables, and
the tests check that every field a job writes is listed here (``<metric>`` stands for any metric name of the
task's type: ``accuracy``, ``macro_f1``, ``entity_f1``, ``exact_match``, ...)."""

from __future__ import annotations

import re

RUN_FIELDS: dict[str, str] = {
    "method": "the sequence method: `adapters`, `shared-adapter`, `full-finetune`, `ewc`, `lwf` or `replay`",
    "setting": "`task-incremental` or `class-incremental`",
    "adapter_kind": "the adapter kind trained (`adapter.kind`)",
    "router": "class-incremental isolated adapters: the router kind (`lda` or `trained`); else null",
    "router_training": "a trained router only: `{epochs, lr}` it was trained with",
    "tasks": "task names in training order",
    "accuracy_matrix": "R[i][j]: task j's primary test metric after training task i (null where not evaluated)",
    "baseline_accuracy": "b_j: each task's primary metric on the untrained model (its fresh adapter and head)",
    "reference_accuracy": "a*_j: each task's primary metric for a model trained on it alone "
    "(`monitor.reference: true`), else null",
    "acc": "ACC = (1/T) Σ_j R[T−1][j]",
    "bwt": "BWT = 1/(T−1) Σ_{j<T−1} (R[T−1][j] − R[j][j]) (Lopez-Paz & Ranzato 2017)",
    "fwt": "FWT = 1/(T−1) Σ_{j≥1} (R[j−1][j] − b_j)",
    "forgetting": "1/(T−1) Σ_{j<T−1} max_{l<T−1} (R[l][j] − R[T−1][j]) (Chaudhry et al. 2018)",
    "intransigence": "mean over tasks of a*_j − R[j][j] (null without reference models)",
    "intransigence_per_task": "a*_j − R[j][j] per task (null without reference models)",
    "per_task": "per task: `val_accuracy`, `epochs`, `train_wall_time_s`, `trainable_params`, `reused`, `metric`, "
    "`final_accuracy`, `final_<metric>`, `accuracy_after_training`, `baseline_accuracy`",
    "interim": "`monitor.every_n_val_epochs`: earlier tasks' scores evaluated while a later task trained",
    "backbone": "`{name, fingerprint, params}` of the frozen backbone",
    "seed": "the run's seed",
    "wall_time_s": "the whole job's wall time in seconds",
    "versions": "torch, transformers, lightning and adafuse versions",
    "strategy": "the strategy's settings and what it kept (e.g. `replay_indices`, `replay_memory`); empty for "
    "the other methods",
    "<metric>_matrix": "the same matrix as `accuracy_matrix` for every other metric of the tasks' types",
    "final_<metric>": "the mean of that metric's last row",
    "oracle_accuracy_matrix": "class-incremental: the same models given the task (a task-incremental run's matrix)",
    "task_id_accuracy_matrix": "class-incremental isolated adapters: share of task j's inputs routed to task j",
}

FUSION_FIELDS: dict[str, str] = {
    "method": "`fusion`, or `single-adapter` for `--baseline single-adapter`",
    "target": "the target task's name",
    "sources": "the adapters composed, in order",
    "fusion": "the fusion's name in the library (null for the baseline)",
    "metric": "the target type's primary metric",
    "test": "test metrics of the stored fusion (or baseline adapter): `accuracy`, `macro_f1`, ...",
    "validation": "the same on the validation split",
    "source_accuracy_recorded": "each source's test accuracy as the library recorded it when it was trained "
    "(null where none was recorded)",
    "source_accuracy_before": "each source's test accuracy before fusion trained: the recorded score of the "
    "sha256-checked artefact, measured here only where none was recorded (null: not a built-in task)",
    "source_accuracy_after": "each source's test accuracy measured after fusion trained (must equal `before`)",
    "source_files_unchanged": "every source's sha256 after training equals its sha256 before",
    "trainable_params": "parameters that trained (fusion layers and head, or the baseline's adapter and head)",
    "epochs": "epochs trained",
    "train_wall_time_s": "training wall time in seconds",
    "wall_time_s": "the whole job's wall time in seconds",
    "ranking": "`sources: {auto: K}`: every candidate's proxy scores and the chosen ones; else null",
    "attention": "mean fusion attention weight per (layer, location) × source on the test split",
    "composition_weights": "weighted composition: the learned weight per source; else null",
    "label_names": "the target's labels in id order",
    "lr": "the fusion's (or baseline adapter's) learning rate",
    "head_lr": "the head's learning rate",
    "seed": "the job's seed",
}


def undocumented(fields: dict[str, str], written: dict) -> list[str]:
    """Keys of ``written`` that ``fields`` does not list (``<metric>`` in a field name matches any name)."""
    any_metric = re.escape("<metric>")
    patterns = [re.compile("^" + re.escape(name).replace(any_metric, "[a-z0-9_]+") + "$") for name in fields]
    return [key for key in written if not any(p.match(key) for p in patterns)]
