"""The fusion recipe on bbc-topic5-fewshot: training budget, learning rates and source quality, chosen on
validation and confirmed on test over seeds, with the single-adapter baseline given the same budget and care.

    python benchmarks/fusion_recipe.py --library 1ep=runs/bbc/library --library 2ep=runs/bbc-2ep/library \
        --recipes default,150-steps-lr1e-3 --methods fusion,single-adapter --seeds 0 \
        --work runs/recipe --out runs/recipe.jsonl

Every (library, recipe, method, seed) is one ``adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml`` (the
single adapter with ``--baseline single-adapter``) with the recipe's overrides; ``--check_sources false``
(the source tasks' invariance is tested elsewhere and costs two test passes per source). A job whose
metrics.json exists is not run again. The table (mean ± std over seeds, validation and test) goes to stdout
and ``<out>.md``; choose on the validation column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSION = ROOT / "configs/fusion/bbc-topic5-fewshot.yaml"
STEPS_150 = ["--trainer.max_epochs", "30", "--trainer.early_stopping_patience", "null"]  # 5 steps an epoch


ADAPTERHUB = ["--backbone.dropout", "true", "--fusion.dropout", "0.1", "--trainer.warmup_ratio", "0"]
ADAPTERHUB += ["--trainer.val_every_n_epochs", "30"]


def _lr(rate: str) -> list[str]:
    return ["--trainer.lr", rate, "--trainer.head_lr", rate]


RECIPES = {
    "default": [],  # the config as it is: 30 epochs (150 steps) at lr 1e-3, the best epoch on validation kept
    # the earlier default: 8 epochs (40 steps) at lr 3e-3, early stopping after 3 epochs without gain
    "40-steps-lr3e-3": [*["--trainer.max_epochs", "8", "--trainer.early_stopping_patience", "3"], *_lr("3e-3")],
    "150-steps-lr1e-3": [*STEPS_150, *_lr("1e-3")],
    "150-steps-lr3e-3": [*STEPS_150, *_lr("3e-3")],
    "150-steps-lr1e-2": [*STEPS_150, *_lr("1e-2")],
    "150-steps-lr1e-3-temperature": [*STEPS_150, *_lr("1e-3"), "--fusion.temperature", "true"],
    "150-steps-lr1e-3-score-dropout": [*STEPS_150, *_lr("1e-3"), "--fusion.dropout", "0.1"],
    "300-steps-lr1e-3": ["--trainer.max_epochs", "60", "--trainer.early_stopping_patience", "null", *_lr("1e-3")],
    # an effective batch of 32: 5 batches an epoch make 3 optimizer steps (the last one short), 150 in 50 epochs
    "150-steps-lr1e-3-batch32": [
        *["--trainer.max_epochs", "50", "--trainer.early_stopping_patience", "null", *_lr("1e-3")],
        *["--trainer.accumulate_grad_batches", "2"],
    ],
    "150-steps-lr1e-3-no-regularizer": [*STEPS_150, *_lr("1e-3"), "--fusion.regularization", "false"],
    "150-steps-lr1e-3-no-value": [*STEPS_150, *_lr("1e-3"), "--fusion.value", "false"],
    # AdapterHub's training semantics on the default budget: the backbone's dropout on, dropout on the fusion
    # scores (its attention_probs_dropout_prob), no warm-up, the last step's weights kept (validated once)
    "adapterhub": [*ADAPTERHUB],
    # each of those alone, on the default config
    "backbone-dropout": ["--backbone.dropout", "true"],
    "score-dropout": ["--fusion.dropout", "0.1"],
    "no-warmup": ["--trainer.warmup_ratio", "0"],
    "last-step": ["--trainer.val_every_n_epochs", "30"],
}
BASELINE = {"fusion": [], "single-adapter": ["--baseline", "single-adapter"]}


def run(library: Path, out: Path, seed: int, options: list[str]) -> dict:
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "adafuse.continual.cli", "fuse", str(FUSION), "--library", str(library)]
        command += ["--out", str(out), "--seed", str(seed), "--check_sources", "false", *options]
        print("$ adafuse", " ".join(command[3:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


def stat(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(records: list[dict]) -> str:
    lines = [
        "| library | recipe | method | seeds | validation accuracy | test accuracy | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["library"], r["recipe"], r["method"]) for r in records)
    for library, recipe, method in keys:
        rows = [r for r in records if (r["library"], r["recipe"], r["method"]) == (library, recipe, method)]
        training = statistics.mean(r["train_wall_time_s"] for r in rows)
        lines.append(
            f"| {library} | {recipe} | {method} | {len(rows)} | {stat([r['validation_accuracy'] for r in rows])} | "
            f"{stat([r['test_accuracy'] for r in rows])} | {training:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", action="append", required=True, help="NAME=PATH of a bbc-topics library")
    parser.add_argument("--recipes", default="default", help=f"comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--methods", default="fusion,single-adapter")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--work", default="runs/recipe")
    parser.add_argument("--out", default="runs/recipe.jsonl")
    args = parser.parse_args()
    records = []
    for spec in args.library:
        label, _, path = spec.partition("=")
        for recipe in args.recipes.split(","):
            for method in args.methods.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = Path(args.work) / label / recipe / method / f"seed{seed}"
                    metrics = run(Path(path).resolve(), out.resolve(), seed, [*RECIPES[recipe], *BASELINE[method]])
                    records.append(
                        {
                            "library": label,
                            "recipe": recipe,
                            "method": method,
                            "seed": seed,
                            "validation_accuracy": metrics["validation"]["accuracy"],
                            "test_accuracy": metrics["test"]["accuracy"],
                            "epochs": metrics["epochs"],
                            "lr": metrics["lr"],
                            "train_wall_time_s": metrics["train_wall_time_s"],
                        }
                    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
    text = table(records)
    Path(f"{out}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
