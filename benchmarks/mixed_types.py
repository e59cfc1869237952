"""One decoder, three task types, through the public CLI: the mixed-types sequence and generation throughput.

    python benchmarks/mixed_types.py --work runs/mixed --out runs/mixed.jsonl

1. ``adafuse run configs/sequence/mixed-types.yaml`` (BBC sports -> synthetic tagging -> synthetic
   generation on a MiniLM-size GPT-2): the metric matrix, ACC, BWT, wall time (skipped when its
   metrics.json exists).
2. ``adafuse predict --task-column`` over the generation task's test prompts, repeated ``--repeat`` times,
   through the run's library: rows/s and generated tokens/s (greedy, batch ``--batch-size``; the time
   includes loading the library and backbone once).

The step cost of fusion on a generation target is ``benchmarks/speed.py --head lm``. One JSONL record per
part is appended to ``--out`` and a Markdown summary to ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sequence" / "mixed-types.yaml"
GENERATION = "synthetic-who-lives-where"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/mixed")
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 100 test prompts to predict")
    parser.add_argument("--batch-size", type=int, default=32)
    args, overrides = parser.parse_known_args(argv)  # the rest: config overrides for the run (--trainer.x v)
    work, out = Path(args.work), Path(args.out)
    run = work / "run"
    if not (run / "metrics.json").is_file():
        command = [sys.executable, "-m", "adafuse.continual.cli", "run", str(CONFIG), *overrides, "--out", str(run)]
        subprocess.run(command, check=True, cwd=ROOT)
    metrics = json.loads((run / "metrics.json").read_text())
    sequence = {
        "kind": "sequence",
        "tasks": metrics["tasks"],
        "metrics": [metrics["per_task"][t]["metric"] for t in metrics["tasks"]],
        "matrix": metrics["accuracy_matrix"],
        "acc": metrics["acc"],
        "bwt": metrics["bwt"],
        "wall_time_s": metrics["wall_time_s"],
        "train_wall_time_s": {t: metrics["per_task"][t].get("train_wall_time_s") for t in metrics["tasks"]},
    }
    throughput = predict_throughput(run / "library", work, args.repeat, args.batch_size)
    with out.open("a") as handle:
        for record in (sequence, throughput):
            handle.write(json.dumps(record) + "\n")
    table = summary(sequence, throughput)
    print(table)
    with Path(f"{out}.md").open("a") as handle:
        handle.write(table + "\n")
    return 0


def predict_throughput(library: Path, work: Path, repeat: int, batch_size: int) -> dict:
    from adafuse.continual.jobs.predict import run_predict
    from adafuse.tasks.builtin import load_builtin

    prompts = load_builtin(GENERATION).splits["test"].texts * repeat
    source, target = work / "prompts.jsonl", work / "generated.jsonl"
    source.write_text("".join(json.dumps({"text": p, "task": GENERATION}) + "\n" for p in prompts))
    started = time.perf_counter()
    rows = run_predict(library, source, target, task_column="task", batch_size=batch_size)
    seconds = time.perf_counter() - started
    tokens = sum(json.loads(line)["tokens"] for line in target.read_text().splitlines())
    return {
        "kind": "predict",
        "rows": rows,
        "generated_tokens": tokens,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "batch_size": batch_size,
    }


def summary(sequence: dict, throughput: dict) -> str:
    names = [f"{t} ({m})" for t, m in zip(sequence["tasks"], sequence["metrics"], strict=True)]
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task, row in zip(sequence["tasks"], sequence["matrix"], strict=True):
        lines.append(f"| {task} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in row) + " |")
    lines += [
        "",
        f"ACC {sequence['acc']:.4f}, BWT {sequence['bwt']:+.4f}, wall time {sequence['wall_time_s']:.0f} s.",
        f"predict: {throughput['rows']} prompts, {throughput['generated_tokens']} tokens in {throughput['seconds']} s"
        f" = {throughput['tokens_per_s']} tokens/s, {throughput['rows_per_s']} prompts/s (batch "
        f"{throughput['batch_size']}, load included).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
