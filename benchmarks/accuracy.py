"""The BBC protocol end to end through the public CLI, over seeds: accuracy, forgetting, wall time.

    python benchmarks/accuracy.py --seeds 0,1,2 --methods adapters,shared-adapter,full-finetune --fusion \
        --work runs/accuracy --out runs/accuracy.jsonl

For each seed: ``adafuse run configs/sequence/bbc-topics.yaml --method M --seed S`` per method, then (with
``--fusion``) ``adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml`` on that seed's adapters library and
its ``--baseline single-adapter``. Each finished job's metrics.json is read back into one JSONL record;
a job whose metrics.json exists is not run again (delete its folder to re-measure). The Markdown table
(mean ± std over seeds) is printed and appended to ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# full fine-tuning moves 22 M parameters: its usual small learning rate, with the head at the adapters' rate
METHOD_OVERRIDES = {"full-finetune": ["--trainer.lr", "2e-5", "--trainer.head_lr", "1e-3"]}
# joint: the class-incremental reference without increments. One adapter and one head over all five BBC
# categories, trained on every task's training data at once (the built-in bbc-topic5 task: the same articles
# and splits as the union of bbc-class-incremental's tasks), with the sequence config's adapter and trainer.
JOINT = ["--method", "adapters", "--sequence", "null", "--tasks", "[bbc-topic5]", "--setting", "task-incremental"]
# --kinds: each kind near the rf-16 bottleneck's 113 k parameters on MiniLM where the method allows it (LoRA
# r = 12 on q, v: 111 k); Compacter in its paper's setting (houlsby, gelu, n = 4), which is far smaller
KIND_OVERRIDES = {
    "bottleneck": [],
    "parallel": ["--adapter.kind", "parallel"],
    "compacter": ["--adapter.kind", "compacter", "--adapter.placement", "houlsby", "--adapter.non_linearity", "gelu"],
    "lora": ["--adapter.kind", "lora", "--adapter.r", "12", "--adapter.alpha", "24"],
    "prefix": ["--adapter.kind", "prefix"],  # P = 30, MLP width 24 (d / 16), tanh: 136 k
}


def run_job(args: list[str], out: Path) -> dict:
    """Run one ``adafuse`` command (unless its metrics.json exists) and return its metrics."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        command = [sys.executable, "-m", "adafuse.continual.cli", *args, "--out", str(out)]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(metrics.read_text())


def method_label(metrics: dict) -> str:
    """The method with its adapter kind and, where it routes, its router: ``adapters (bottleneck, lda router)``,
    ``adapters (bottleneck, trained router: 3 epochs at lr 0.003)``."""
    router = metrics.get("router") and f"{metrics['router']} router"
    training = metrics.get("router_training")
    if router and training:
        router += f": {training['epochs']} epochs at lr {training['lr']:g}"
    details = [d for d in (metrics.get("adapter_kind"), router) if d]
    return f"{metrics['method']} ({', '.join(details)})" if details else metrics["method"]


def sequence_record(metrics: dict, seed: int, label: str | None = None) -> dict:
    per_task = metrics["per_task"]
    return {
        "kind": "sequence",
        "method": label or method_label(metrics),
        "seed": seed,
        "tasks": {name: per_task[name]["final_accuracy"] for name in metrics["tasks"]},
        "acc": metrics["acc"],
        "bwt": metrics["bwt"],
        "forgetting": metrics["forgetting"],
        "fwt": metrics["fwt"],
        "wall_time_s": metrics["wall_time_s"],
        "trainable_params": max(t["trainable_params"] for t in per_task.values()),
        # class-incremental runs: the same models given the task, and how often the router named it
        "oracle_acc": metrics.get("final_oracle_accuracy"),
        "task_id_acc": metrics.get("final_task_id_accuracy"),
    }


def fusion_record(metrics: dict, seed: int) -> dict:
    return {
        "kind": "fusion",
        "method": metrics["method"],
        "seed": seed,
        "target": metrics["target"],
        "test_accuracy": metrics["test"]["accuracy"],
        "test_macro_f1": metrics["test"]["macro_f1"],
        "sources_unchanged": metrics["source_accuracy_before"] == metrics["source_accuracy_after"],
        "wall_time_s": metrics["wall_time_s"],
        "trainable_params": metrics["trainable_params"],
    }


def mean_std(values: list[float | None], digits: int = 4) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render_table(records: list[dict]) -> str:
    """Markdown tables, mean ± std over seeds, one row per method (pure: records in, text out)."""
    lines = []
    sequences = [r for r in records if r["kind"] == "sequence"]
    if sequences:
        tasks = list(sequences[0]["tasks"])
        extra = [k for k in ("oracle_acc", "task_id_acc") if any(r.get(k) is not None for r in sequences)]
        header = ["method", "seeds", *tasks, "ACC", "BWT", "forgetting", "FWT", *extra, "wall s", "trainable"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in dict.fromkeys(r["method"] for r in sequences):
            rows = [r for r in sequences if r["method"] == method]
            cells = [method, str(len(rows))]
            cells += [mean_std([r["tasks"].get(t) for r in rows]) for t in tasks]
            cells += [mean_std([r.get(k) for r in rows]) for k in ("acc", "bwt", "forgetting", "fwt", *extra)]
            cells += [mean_std([r["wall_time_s"] for r in rows], 0), f"{rows[0]['trainable_params']:,}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    fusions = [r for r in records if r["kind"] == "fusion"]
    if fusions:
        lines += [
            "| target | method | seeds | test accuracy | test macro-F1 | sources unchanged | wall s | trainable |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in fusions):
            rows = [r for r in fusions if r["method"] == method]
            lines.append(
                f"| {rows[0]['target']} | {method} | {len(rows)} | {mean_std([r['test_accuracy'] for r in rows])} | "
                f"{mean_std([r['test_macro_f1'] for r in rows])} | {all(r['sources_unchanged'] for r in rows)} | "
                f"{mean_std([r['wall_time_s'] for r in rows], 0)} | {rows[0]['trainable_params']:,} |"
            )
        gains = _paired_gains(fusions)
        if gains:
            lines += ["", f"fusion − single-adapter (paired by seed): {mean_std(gains)} test accuracy"]
    return "\n".join(lines) + "\n"


def _paired_gains(fusions: list[dict]) -> list[float]:
    by_seed = {(r["method"], r["seed"]): r["test_accuracy"] for r in fusions}
    return [
        by_seed[("fusion", seed)] - by_seed[("single-adapter", seed)]
        for (method, seed) in by_seed
        if method == "fusion" and ("single-adapter", seed) in by_seed
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--methods",
        default="adapters,shared-adapter,full-finetune",
        help="sequence methods, and joint: the bbc-class-incremental reference trained on all its data at once",
    )
    parser.add_argument("--fusion", action="store_true", help="also fusion + single-adapter baseline per seed")
    parser.add_argument(
        "--kinds", default="", help=f"isolated adapters of each kind instead: {','.join(KIND_OVERRIDES)}"
    )
    parser.add_argument("--config", default="configs/sequence/bbc-topics.yaml")
    parser.add_argument("--fuse-config", default="configs/fusion/bbc-topic5-fewshot.yaml")
    parser.add_argument("--work", default="runs/accuracy", help="folder of the runs (reused when re-run)")
    parser.add_argument("--out", required=True, help="JSONL of records; the table goes to <out>.md")
    args, overrides = parser.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if args.fusion and "adapters" not in methods:
        methods.insert(0, "adapters")  # fusion needs that seed's adapter library
    work = Path(args.work)
    records = []
    kinds = [k for k in args.kinds.split(",") if k]
    if kinds:
        methods, unknown = [], [k for k in kinds if k not in KIND_OVERRIDES]
        if unknown:
            sys.exit(f"accuracy.py: unknown kinds {unknown}; expected some of {', '.join(KIND_OVERRIDES)}")
    for seed in seeds:
        for kind in kinds:
            command = ["run", args.config, "--seed", str(seed), *KIND_OVERRIDES[kind], *overrides]
            records.append(sequence_record(run_job(command, work / f"seed{seed}" / f"adapters-{kind}"), seed))
        for method in methods:
            if method == "joint":  # the sequence's router options do not apply: one task, no routing
                metrics = run_job(["run", args.config, "--seed", str(seed), *JOINT], work / f"seed{seed}" / method)
                records.append(sequence_record(metrics, seed, "joint (all tasks' data at once)"))
                continue
            command = ["run", args.config, "--method", method, "--seed", str(seed), *METHOD_OVERRIDES.get(method, [])]
            records.append(sequence_record(run_job([*command, *overrides], work / f"seed{seed}" / method), seed))
        if args.fusion:
            library = str(work / f"seed{seed}" / "adapters" / "library")
            fuse = ["fuse", args.fuse_config, "--library", library, "--seed", str(seed)]
            records.append(fusion_record(run_job(fuse, work / f"seed{seed}" / "fusion"), seed))
            baseline = [*fuse, "--baseline", "single-adapter"]
            records.append(fusion_record(run_job(baseline, work / f"seed{seed}" / "single-adapter"), seed))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = render_table(records)
    print(table)
    with Path(str(out) + ".md").open("a") as handle:
        handle.write(table + "\n")


if __name__ == "__main__":
    main()
