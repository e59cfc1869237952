"""Step-time and memory benchmark: floor, single adapter and AdapterFusion, each in a fresh process.

    python benchmarks/speed.py --methods floor_fwd,floor_train,single_train,single_infer,fusion_train,fusion_infer \
        --fusion-k 2,4,8,16 -B 16 -L 128 --warmup 3 --steps 10 --out speed.jsonl

One JSONL record per measurement (fields as in the design notes), then a Markdown table of ratios measured
in this one run, printed and appended to ``<out>.md``. A training step is forward + loss + backward +
optimizer step; inference is a forward under ``torch.inference_mode``. The batch is fixed and seeded:
token ids uniform in the vocabulary, mask all ones, binary labels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("floor_fwd", "floor_train", "single_train", "single_infer", "fusion_train", "fusion_infer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--fusion-k", default="2,4,8,16")
    p.add_argument("-B", "--batch-size", type=int, default=16)
    p.add_argument("-L", "--length", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="speed.jsonl")
    p.add_argument("--backbone", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby"])
    p.add_argument(
        "--malloc", default="tuned", choices=["tuned", "default"], help="glibc thresholds as the adafuse CLI sets them"
    )
    p.add_argument("--child", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args, method: str, k: int):
    import torch

    from adafuse.fusion.attention import FusionConfig
    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.bottleneck import BottleneckConfig
    from adafuse.fusion.model import AdaptedModel

    torch.manual_seed(0)
    model = AdaptedModel(load_model(BackboneConfig(name=args.backbone)))
    model.add_head("head", 2)
    adapter = BottleneckConfig(placement=args.placement)
    if method.startswith("single"):
        model.add_adapter("a0", adapter)
        model.activate(["a0"], head="head")
        model.set_trainable(adapters=["a0"], heads=["head"])
    elif method.startswith("fusion"):
        names = [f"a{i}" for i in range(k)]
        for name in names:
            model.add_adapter(name, adapter)
        with torch.no_grad():  # trained-looking sources: non-zero up-projections
            for _, _, slot in model.slots():
                for a in slot.adapters.values():
                    a.up.weight.normal_(std=0.02)
        model.add_fusion("fusion", names, FusionConfig())
        model.activate(fusion="fusion", head="head")
        model.set_trainable(fusions=["fusion"], heads=["head"])
    else:
        model.activate([], head="head")
        model.set_trainable(heads=["head"])
    return model.to(args.device)


def measure(args, method: str, k: int) -> dict:
    import torch

    from adafuse.continual.allocator import tune_malloc

    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    torch.set_num_threads(args.threads)
    model = build(args, method, k)
    vocab = model.backbone.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.length), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g).to(args.device)
    train = method.endswith("train")
    model.train(train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if train else None
    embeddings = model.backbone.get_input_embeddings()
    autocast = torch.autocast(
        device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"
    )
    losses, times = [], []

    def step():
        if not train:
            with torch.inference_mode(), autocast:
                return model(ids, mask).float().sum().item()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if method == "floor_train":  # backward all the way to the (frozen) embeddings
                embeds = embeddings(ids).detach().requires_grad_(True)
                hidden = model.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
                logits = model.heads["head"](hidden, mask)
            else:
                logits = model(ids, mask)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels) + model.fusion_regularization()
        loss.backward()
        optimizer.step()
        return loss.item()

    for i in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
            losses.append(value)
    median = statistics.median(times)
    import transformers

    return {
        "impl": "adafuse",
        "backbone": args.backbone,
        "method": method,
        "K": 0 if method.startswith("floor") else 1 if method.startswith("single") else k,
        "B": args.batch_size,
        "L": args.length,
        "placement": args.placement,
        "precision": args.precision,
        "malloc": malloc,
        "step_ms_median": round(median, 3),
        "samples_per_s": round(args.batch_size / median * 1000, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device.startswith("cuda") else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": args.threads,
        "step_ms_all": [round(t, 3) for t in times],
        "loss_first": losses[0] if train else None,
        "loss_last": losses[-1] if train else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def plan(args) -> list[tuple[str, int]]:
    runs = []
    for method in args.methods.split(","):
        if method not in METHODS:
            sys.exit(f"speed.py: unknown method '{method}'; expected one of {', '.join(METHODS)}")
        ks = [int(k) for k in args.fusion_k.split(",")] if method.startswith("fusion") else [0]
        runs += [(method, k) for k in ks]
    return runs * args.repeat


def ratio_table(records: list[dict]) -> str:
    def med(method, k=None):
        values = [r["step_ms_median"] for r in records if r["method"] == method and (k is None or r["K"] == k)]
        return statistics.median(values) if values else None

    def rss(method, k=None):
        values = [r["peak_rss_mb"] for r in records if r["method"] == method and (k is None or r["K"] == k)]
        return statistics.median(values) if values else None

    rows = []
    if med("single_train") and med("floor_train"):
        rows.append(("single_train / floor_train", med("single_train") / med("floor_train")))
    if med("single_infer") and med("floor_fwd"):
        rows.append(("single_infer / floor_fwd", med("single_infer") / med("floor_fwd")))
    for k in sorted({r["K"] for r in records if r["method"].startswith("fusion")}):
        if med("fusion_train", k) and med("single_train"):
            rows.append((f"fusion_train K={k} / single_train", med("fusion_train", k) / med("single_train")))
        if med("fusion_infer", k) and med("single_infer"):
            rows.append((f"fusion_infer K={k} / single_infer", med("fusion_infer", k) / med("single_infer")))
        if rss("fusion_train", k) and rss("single_train"):
            rows.append((f"peak RSS fusion_train K={k} / single_train", rss("fusion_train", k) / rss("single_train")))
    first = records[0]
    header = (
        f"\n### adafuse speed ratios — {first['backbone']}, B={first['B']}, L={first['L']}, "
        f"{first['device']}, threads={first['threads']}, precision={first['precision']}, "
        f"placement={first['placement']}, malloc={first.get('malloc', 'default')}\n\n| ratio | value |\n|---|---|\n"
    )
    medians = "\n".join(f"| {r['method']} K={r['K']} step ms | {r['step_ms_median']:.1f} |" for r in records)
    return header + "\n".join(f"| {name} | {value:.3f} |" for name, value in rows) + "\n" + medians + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args, args.child[0], int(args.child[1]))))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    for method, k in plan(args):
        result = subprocess.run(
            [sys.executable, __file__, *passthrough, "--child", method, str(k)], capture_output=True, text=True, env=env
        )
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-2000:])
            return 1
        record = json.loads(result.stdout.strip().splitlines()[-1])
        records.append(record)
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(
            f"{method:<13} K={record['K']:<3} {record['step_ms_median']:9.1f} ms  "
            f"{record['samples_per_s']:8.1f} samples/s  RSS {record['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    table = ratio_table(records)
    print(table)
    with Path(str(out) + ".md").open("a") as handle:
        handle.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
