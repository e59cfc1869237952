"""Fusion at library scale: does ``--sources auto`` find the five useful adapters among 25?

    python benchmarks/library_scale.py --base-library runs/accuracy/seed0/adapters/library \
        --work runs/library-scale --seeds 0,1,2 --out runs/library-scale.jsonl

1. The library: the five ``bbc-topics`` adapters (``--base-library``, or ``adafuse run
   configs/sequence/bbc-topics.yaml``) plus 20 distractors appended by one ``adafuse run`` over user tasks built
   here from the BBC corpus: eight with the five category labels shuffled across articles (no signal) and
   twelve unrelated article properties (length bins, first letter, word-count parity, digits, quotes,
   percent and currency signs, word length, capitals). Each distractor trains one epoch on 320 train
   articles (40 validation, 40 test), like the sources.
2. The cost: ``adafuse library rank`` over 100 adapters (the 25 plus 75 perturbed copies of the
   distractors, heads included), wall time of the command and of the ranking itself.
3. Per seed, ``adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml`` with the sources chosen five ways:
   auto top-5 by LEEP, auto top-5 by the probe, all 25, the true five, a random five (seeded). Validation
   chooses between the proxies; test accuracy and training time are the table.

A job whose metrics.json exists is not run again. Records go to ``--out`` (JSONL) and a Markdown table to
``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from adafuse.fusion.library import AdapterLibrary
from adafuse.tasks.bbc import CATEGORIES, load_articles

ROOT = Path(__file__).resolve().parents[1]
FUSION = ROOT / "configs/fusion/bbc-topic5-fewshot.yaml"
TRUE_FIVE = [f"bbc-{c}" for c in CATEGORIES]
SIZES = {"train": 320, "validation": 40, "test": 40}


def _quantile_bins(values: list[float], bins: int):
    ranked = sorted(values)
    edges = [ranked[len(ranked) * b // bins] for b in range(1, bins)]
    return lambda value: sum(value >= edge for edge in edges)


def distractor_labels(articles) -> dict[str, list[str]]:
    """Label per article for each distractor task (names: ``distractor-<what>``)."""
    texts = [a.text for a in articles]
    words = [t.split() for t in texts]
    lengths = [len(w) for w in words]
    mean_word = [sum(map(len, w)) / max(1, len(w)) for w in words]
    capitals = [sum(x[:1].isupper() for x in w) / max(1, len(w)) for w in words]
    tasks = {}
    for index in range(8):  # the true categories, shuffled across articles: same label set, no signal
        labels = [a.category for a in articles]
        random.Random(index).shuffle(labels)
        tasks[f"shuffled-{index}"] = labels
    for bins in (2, 3, 4):
        rule = _quantile_bins(lengths, bins)
        tasks[f"length-{bins}"] = [f"bin{rule(n)}" for n in lengths]
    initials = [t[:1].upper() for t in texts]
    tasks["first-letter-2"] = ["a-m" if c <= "M" else "n-z" for c in initials]
    tasks["first-letter-3"] = ["a-f" if c <= "F" else "g-r" if c <= "R" else "s-z" for c in initials]
    tasks["word-parity"] = ["even" if n % 2 == 0 else "odd" for n in lengths]
    tasks["digit-early"] = ["yes" if any(c.isdigit() for c in " ".join(w[:20])) else "no" for w in words]
    for name, mark in (("quote", '"'), ("percent", "%")):
        tasks[f"has-{name}"] = ["yes" if mark in t else "no" for t in texts]
    tasks["has-currency"] = ["yes" if "$" in t or "£" in t else "no" for t in texts]
    for name, values in (("long-words", mean_word), ("capitals", capitals)):
        rule = _quantile_bins(values, 2)
        tasks[name] = ["high" if rule(v) else "low" for v in values]
    return {f"distractor-{name}": labels for name, labels in tasks.items()}


def write_distractors(work: Path) -> Path:
    """The distractor tasks' JSONL splits and the sequence config that trains them; returns the config."""
    articles = load_articles()
    specs = []
    for offset, (name, labels) in enumerate(distractor_labels(articles).items()):
        folder = work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, size in SIZES.items():
            rows = [(a.text, label) for a, label in zip(articles, labels, strict=True) if a.split == split]
            random.Random(offset * 7 + len(split)).shuffle(rows)
            lines = [json.dumps({"text": text, "label": label}) for text, label in rows[:size]]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        splits = {split: f"{split}.jsonl" for split in SIZES}
        specs.append({"name": name, "source": str(folder), "splits": splits})
    config = yaml.safe_load((ROOT / "configs/sequence/bbc-topics.yaml").read_text())
    config.update(sequence=None, tasks=specs)
    path = work / "distractors.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def adafuse(*args: str) -> float:
    """Run one ``adafuse`` command; returns its wall time."""
    command = [sys.executable, "-m", "adafuse.continual.cli", *args]
    print("$ adafuse", " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def build_library(work: Path, base: Path | None) -> Path:
    library = work / "library"
    if (work / "distractors" / "metrics.json").is_file():
        return library
    if base is not None:
        shutil.rmtree(library, ignore_errors=True)
        shutil.copytree(base, library)
    else:
        adafuse("run", "configs/sequence/bbc-topics.yaml", "--out", str(work / "topics"), "--library", str(library))
    adafuse("run", str(write_distractors(work)), "--out", str(work / "distractors"), "--library", str(library))
    return library


def ranking_cost(work: Path, library: Path, total: int = 100) -> dict:
    """``library rank`` over ``total`` adapters: the 25 plus perturbed copies of the distractors."""
    big = work / "library-100"
    if not big.is_dir():
        shutil.copytree(library, big)
        store = AdapterLibrary(big)
        fingerprint = store.read_manifest()["backbone"]["fingerprint"]
        distractors = [e for e in store.entries("adapter") if e["name"].startswith("distractor-")]
        generator = torch.Generator().manual_seed(0)
        for index in range(total - len(store.entries("adapter"))):
            entry = distractors[index % len(distractors)]
            for kind in ("adapter", "head"):
                source = store.get(kind, entry["name"])
                tensors = {
                    k: v + 0.01 * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=generator)
                    for k, v in store.load(kind, entry["name"], fingerprint).tensors.items()
                }
                store.add(
                    kind,
                    f"copy{index}-{entry['name']}",
                    tensors,
                    fingerprint=fingerprint,
                    config=source["config"],
                    task=source.get("task"),
                )
    result = work / "rank-100.json"
    command = [sys.executable, "-m", "adafuse.continual.cli", "library", "rank", str(FUSION), "--library", str(big)]
    started = time.perf_counter()
    output = subprocess.run([*command, "--json"], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    result.write_text(output)
    ranking = json.loads(output)
    return {
        "kind": "ranking-cost",
        "sources": len(ranking["sources"]),
        "examples": ranking["examples"],
        "max_length": ranking["max_length"],
        "ranking_s": ranking["wall_time_s"],
        "command_s": round(wall, 3),
        "threads": torch.get_num_threads(),
    }


def variants(library: Path, seed: int) -> dict[str, list[str]]:
    everything = [e["name"] for e in AdapterLibrary(library).entries("adapter")]
    return {
        "auto-5 (leep)": ["--sources", "auto", "--top-k", "5", "--ranking.proxy", "leep"],
        "auto-5 (probe)": ["--sources", "auto", "--top-k", "5", "--ranking.proxy", "probe"],
        f"all {len(everything)}": ["--sources", "all"],
        "true 5": ["--sources", ",".join(TRUE_FIVE)],
        "random 5": ["--sources", ",".join(random.Random(1000 + seed).sample(everything, 5))],
    }


def fusion_record(name: str, seed: int, metrics: dict) -> dict:
    ranking = metrics.get("ranking") or {}
    return {
        "kind": "fusion",
        "variant": name,
        "seed": seed,
        "sources": metrics["sources"],
        "true_sources_chosen": len(set(metrics["sources"]) & set(TRUE_FIVE)),
        "test_accuracy": metrics["test"]["accuracy"],
        "validation_accuracy": metrics["validation"]["accuracy"],
        "train_wall_time_s": metrics["train_wall_time_s"],
        "ranking_s": ranking.get("wall_time_s"),
        "wall_time_s": metrics["wall_time_s"],
    }


def table(records: list[dict]) -> str:
    def stat(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    lines = [
        "| sources | test accuracy | validation accuracy | true sources chosen | ranking s | training s |",
        "|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r["variant"] for r in records if r["kind"] == "fusion"))
    for name in names:
        rows = [r for r in records if r.get("variant") == name]
        ranking = [r["ranking_s"] for r in rows if r["ranking_s"] is not None]
        training = statistics.mean(r["train_wall_time_s"] for r in rows)
        lines.append(
            f"| {name} | {stat([r['test_accuracy'] for r in rows])} | {stat([r['validation_accuracy'] for r in rows])}"
            f" | {statistics.mean(r['true_sources_chosen'] for r in rows):.1f} / 5"
            f" | {f'{statistics.mean(ranking):.1f}' if ranking else '–'} | {training:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/library-scale")
    parser.add_argument("--base-library", default=None, help="a bbc-topics library to start from (else trained)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/library-scale.jsonl")
    parser.add_argument("--skip-cost", action="store_true", help="do not time the 100-adapter ranking")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    library = build_library(work, Path(args.base_library).resolve() if args.base_library else None)
    records = [] if args.skip_cost else [ranking_cost(work, library)]
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, options in variants(library, seed).items():
            slug = name.replace(" ", "-").replace("(", "").replace(")", "")
            out = work / f"seed{seed}" / slug
            if not (out / "metrics.json").is_file():
                adafuse(
                    "fuse", str(FUSION), "--library", str(library), "--out", str(out), "--seed", str(seed),
                    "--name", f"fusion-{slug}-s{seed}", "--check_sources", "false", *options,
                )  # fmt: skip
            records.append(fusion_record(name, seed, json.loads((out / "metrics.json").read_text())))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = table(records)
    Path(f"{out}.md").write_text(text + "\n")
    print(text)
    for record in records:
        if record["kind"] == "ranking-cost":
            seconds = f"{record['ranking_s']:.1f} s ({record['command_s']:.1f} s with loading the backbone)"
            print(f"ranking {record['sources']} sources: {seconds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
