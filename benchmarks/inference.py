"""Inference benchmarks on a trained BBC library: mixed-task batching and AdapterDrop.

    python benchmarks/inference.py --library runs/demo/sequence/library \
        --fusion bbc-topic5-fewshot-fusion --adapter bbc-business --drop 0,2,4 --out runs/inference.jsonl

1. ``mixed``: the test texts of the five bbc-topics tasks, shuffled, each row naming its task, streamed in
   batches of ``-B``: one routed forward pass per batch (``adafuse predict --task-column``) against one
   pass per task present in the batch (each on its rows), and against sorting the whole file by task
   first (not streaming). Same rows, same outputs (checked).
2. ``batch-size``: the same shuffled rows, routed in passes of each of ``--sizes`` rows: the milliseconds per
   row as the pass grows, i.e. what batching requests can save in the forward pass itself (a server gathers
   rows of concurrent requests into one pass; a pass of 1-4 rows is what one request at a time gets).
3. ``adapterdrop``: test accuracy and time of ``--adapter`` on its task and ``--fusion`` on
   bbc-topic5-fewshot with the adapters (and fusion) of the lowest N layers skipped.

Times are wall-clock medians over ``--repeat`` runs in this process; one JSONL record per measurement and
a Markdown table appended to ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.continual.jobs.predictor import Predictor
from adafuse.tasks.builtin import SEQUENCES, load_builtin


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def batches(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def run_routed(predictor, rows, size):
    return [r for batch in batches(rows, size) for r in predictor([t for t, _ in batch], [k for _, k in batch])]


def run_per_task(predictor, rows, size):
    out = [None] * len(rows)
    for start, batch in zip(range(0, len(rows), size), batches(rows, size), strict=True):
        for task in dict.fromkeys(k for _, k in batch):
            index = [i for i, (_, k) in enumerate(batch) if k == task]
            for i, result in zip(index, predictor([batch[i][0] for i in index], [task] * len(index)), strict=True):
                out[start + i] = result
    return out


def run_sorted(predictor, rows, size):
    order = sorted(range(len(rows)), key=lambda i: rows[i][1])
    results = run_per_task(predictor, [rows[i] for i in order], size)
    out = [None] * len(rows)
    for i, result in zip(order, results, strict=True):
        out[i] = result
    return out


def shuffled_rows(opened, args) -> tuple[list[tuple[str, str]], Predictor]:
    """The test texts of the five bbc-topics tasks (``--rows-per-task`` each), shuffled, each naming its task, and a
    predictor with the five adapters loaded."""
    rows = []
    for name in SEQUENCES["bbc-topics"]:
        rows += [(text, name) for text in load_builtin(name).splits["test"].texts[: args.rows_per_task]]
    random.Random(0).shuffle(rows)
    predictor = Predictor(opened, args.max_length, torch.device(args.device), 0)
    for name in SEQUENCES["bbc-topics"]:
        predictor.add_task(name)
    return rows, predictor


def mixed_benchmark(opened, args) -> list[dict]:
    rows, predictor = shuffled_rows(opened, args)
    run_routed(predictor, rows[: args.batch_size], args.batch_size)  # warm-up, not timed
    modes = {"routed": run_routed, "per-task": run_per_task, "sorted": run_sorted}
    times = {mode: [] for mode in modes}
    results = {}
    for _ in range(args.repeat):  # interleaved, so drifts of a shared machine hit every mode alike
        for mode, fn in modes.items():
            seconds, results[mode] = timed(lambda fn=fn: fn(predictor, rows, args.batch_size), 1)
            times[mode].append(seconds)
    reference = [r["probabilities"] for r in results["routed"]]
    records = []
    for mode in modes:
        probabilities = [r["probabilities"] for r in results[mode]]
        diff = max(abs(a - b) for p, q in zip(probabilities, reference, strict=True) for a, b in zip(p, q, strict=True))
        seconds = statistics.median(times[mode])
        records.append(
            {"bench": "mixed", "mode": mode, "rows": len(rows), "seconds": round(seconds, 3), "max_prob_diff": diff}
        )
        print(records[-1], flush=True)
    return records


def batch_size_benchmark(opened, args) -> list[dict]:
    rows, predictor = shuffled_rows(opened, args)
    rows = rows[: max(args.sizes) * 2]  # two passes of the largest size
    run_routed(predictor, rows[: max(args.sizes)], max(args.sizes))  # warm-up, not timed
    times: dict[int, list[float]] = {size: [] for size in args.sizes}
    for _ in range(args.repeat):  # interleaved, so drifts of a shared machine hit every size alike
        for size in args.sizes:
            times[size].append(timed(lambda size=size: run_routed(predictor, rows, size), 1)[0])
    records = []
    for size in args.sizes:
        per_row = statistics.median(times[size]) / len(rows) * 1000
        records.append(
            {"bench": "batch-size", "rows_per_pass": size, "rows": len(rows), "ms_per_row": round(per_row, 2)}
        )
        print(records[-1], flush=True)
    return records


def accuracy(predictor, task_name, artefact, args) -> tuple[float, float]:
    test = load_builtin(task_name).splits["test"]
    texts = test.texts[: args.limit] if args.limit else test.texts
    seconds, results = timed(
        lambda: run_routed(predictor, [(t, artefact) for t in texts], args.batch_size), args.repeat
    )
    correct = sum(r["label"] == y for r, y in zip(results, test.labels, strict=False))
    return correct / len(texts), seconds


def drop_benchmark(opened, args) -> list[dict]:
    records = []
    cases = [("adapter", args.adapter, load_task_of(opened, args.adapter))]
    if args.fusion:
        cases.append(("fusion", args.fusion, load_task_of(opened, args.fusion)))
    for kind, artefact, task in cases:
        for drop in args.drop:
            predictor = Predictor(opened, args.max_length, torch.device(args.device), drop)
            predictor.add_task(artefact)
            acc, seconds = accuracy(predictor, task, artefact, args)
            records.append(
                {"bench": "adapterdrop", "kind": kind, "artefact": artefact, "task": task, "drop_layers": drop,
                 "test_accuracy": round(acc, 4), "seconds": round(seconds, 3)}
            )  # fmt: skip
            print(records[-1], flush=True)
    return records


def load_task_of(opened, name: str) -> str:
    entry = opened.library.find("fusion", name) or opened.library.get("adapter", name)
    return entry["task"]


def markdown(records: list[dict], args) -> str:
    lines = [f"### inference — B={args.batch_size}, L={args.max_length}, {args.device}, threads={args.threads}", ""]
    mixed = {r["mode"]: r for r in records if r["bench"] == "mixed"}
    if mixed:
        base = mixed["routed"]["seconds"]
        lines += ["| mixed-task file | rows | seconds | vs routed | max prob diff |", "|---|---|---|---|---|"]
        for mode, r in mixed.items():
            ratio = r["seconds"] / base
            lines.append(f"| {mode} | {r['rows']} | {r['seconds']:.2f} | {ratio:.2f} x | {r['max_prob_diff']:.1e} |")
        lines.append("")
    sizes = [r for r in records if r["bench"] == "batch-size"]
    if sizes:
        lines += ["| rows per pass | rows | ms per row | vs the largest pass |", "|---|---|---|---|"]
        base = sizes[-1]["ms_per_row"]
        for r in sizes:
            lines.append(
                f"| {r['rows_per_pass']} | {r['rows']} | {r['ms_per_row']:.1f} | {r['ms_per_row'] / base:.2f} x |"
            )
        lines.append("")
    drops = [r for r in records if r["bench"] == "adapterdrop"]
    if drops:
        lines += ["| AdapterDrop | task | N | test accuracy | seconds | speed-up |", "|---|---|---|---|---|---|"]
        base = {r["artefact"]: r["seconds"] for r in drops if r["drop_layers"] == 0}
        for r in drops:
            speed = base.get(r["artefact"], r["seconds"]) / r["seconds"]
            lines.append(
                f"| {r['kind']} {r['artefact']} | {r['task']} | {r['drop_layers']} | {r['test_accuracy']:.4f} | "
                f"{r['seconds']:.2f} | {speed:.2f} x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--adapter", default="bbc-business")
    parser.add_argument("--fusion", default=None)
    parser.add_argument("--drop", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2, 4])
    parser.add_argument(
        "--benches", default="mixed,adapterdrop", help="comma-separated: mixed, batch-size, adapterdrop"
    )
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("-B", "--batch-size", type=int, default=32)
    parser.add_argument("-L", "--max-length", type=int, default=128)
    parser.add_argument("--rows-per-task", type=int, default=100)
    parser.add_argument("--limit", type=int, default=0, help="test texts per AdapterDrop case (0: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    opened = LibraryModel.open(args.library)
    records = []
    if "mixed" in args.benches:
        records += mixed_benchmark(opened, args)
    if "batch-size" in args.benches:
        records += batch_size_benchmark(opened, args)
    if "adapterdrop" in args.benches:
        records += drop_benchmark(opened, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        for record in records:
            handle.write(json.dumps({**record, "batch_size": args.batch_size, "max_length": args.max_length}) + "\n")
    table = markdown(records, args)
    print(table)
    with Path(str(out) + ".md").open("a") as handle:
        handle.write(table + "\n")


if __name__ == "__main__":
    main()
