"""Step-time and memory benchmark: floor, single adapter and AdapterFusion.

    python benchmarks/speed.py --methods floor_fwd,floor_train,single_train,single_infer,fusion_train,fusion_infer \
        --fusion-k 2,4,8,16 -B 16 -L 128 --warmup 3 --steps 20 --out speed.jsonl \
        [--backbone embedded | FOLDER | HUB_NAME | configs/backbone/minilm-size-llama.yaml]

Step times come from one process that holds every configuration in one model (the single adapter, K source
adapters and a fusion per K, a head each) and runs them round-robin, one step each per round: a slow spell
of a shared machine then hits every configuration alike, and each ratio is the median over rounds of the
two steps' ratio in that round (paired). Peak memory comes from a fresh process per configuration (it runs
``--rss-steps`` steps of that configuration alone; ``--memory-jobs`` such processes at a time). One JSONL
record per measurement, then a Markdown table of the ratios measured in this one run, printed and appended to
``<out>.md``. A training step is forward + loss + backward + optimizer step; inference is a forward under
``torch.inference_mode``. The batch is fixed and seeded: token ids uniform in the vocabulary, mask all ones,
binary labels.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_METHODS = ("floor_fwd", "floor_train", "single_train", "single_infer", "fusion_train", "fusion_infer")
METHODS = (*DEFAULT_METHODS, "merged_infer")  # with --kind lora: inference after predict --merge's folding
# a continual-learning strategy's training step on one shared adapter, against single_train (its naive
# counterpart), with --old-tasks finished tasks: EWC's penalty, LwF's distillation, replay's extra rows
STRATEGY_STEPS = ("ewc_train", "lwf_train", "replay_train")
METHODS += STRATEGY_STEPS
SHARED = ("single", "merged", *STRATEGY_STEPS)  # configurations that train or run one adapter


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--fusion-k", default="2,4,8,16")
    p.add_argument("-B", "--batch-size", type=int, default=16)
    p.add_argument("-L", "--length", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed rounds (after --warmup rounds)")
    p.add_argument("--rss-steps", type=int, default=3, help="steps of each fresh memory process (0: no memory runs)")
    p.add_argument("--memory-jobs", type=int, default=1,
                   help="memory processes run at a time (each peak is its own process's; their step times are not "
                   "reported)")  # fmt: skip
    p.add_argument("--out", default="speed.jsonl")
    p.add_argument(
        "--backbone",
        default="embedded",
        help="embedded, a model folder, a Hub name, or a backbone YAML (e.g. configs/backbone/minilm-size-gpt2.yaml)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby"])
    p.add_argument(
        "--head",
        default="classification",
        choices=["classification", "lm"],
        help="lm: the backbone's language-model head, next-token loss on every position (a generation target)",
    )
    p.add_argument("--kind", default="bottleneck", choices=["bottleneck", "parallel", "compacter", "lora", "prefix"])
    p.add_argument("--skip-layers", type=int, default=0, help="AdapterDrop in training: no adapter/fusion below")
    p.add_argument("--lora-r", type=int, default=12, help="LoRA rank (12 on q, v: the rf-16 bottleneck's budget)")
    p.add_argument("--prefix-length", type=int, default=30, help="prefix tuning: key/value positions per layer")
    p.add_argument("--old-tasks", type=int, default=4, help="strategy steps: finished tasks (heads, memory)")
    p.add_argument(
        "--malloc", default="tuned", choices=["tuned", "default"], help="glibc thresholds as the adafuse CLI sets them"
    )
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "default", "reduce-overhead", "max-autotune"],
        help="also time every method compiled in this mode, interleaved with eager (records carry `compile`)",
    )
    p.add_argument(
        "--phases", action="store_true",
        help="also time a training step's forward (with the loss), backward and optimizer step apart (medians in "
        "forward_ms, backward_ms, optimizer_ms; on CUDA each phase ends with a synchronisation)",
    )  # fmt: skip
    p.add_argument("--child", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    p.add_argument("--child-interleaved", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args, configs: list[tuple[str, int]]):
    """One model holding what every configuration needs, each its own: an adapter or a fusion over the first K
    of the shared source adapters, and a head (so training one configuration never changes another)."""
    import torch

    from adafuse.fusion.attention import FusionConfig
    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.kinds import AdapterConfig
    from adafuse.fusion.model import AdaptedModel

    torch.manual_seed(0)
    if args.backbone.endswith((".yaml", ".yml")):  # e.g. a random-init decoder of MiniLM's size
        from adafuse.continual.config import load_config

        backbone = load_config(BackboneConfig, args.backbone)
    else:
        backbone = BackboneConfig(name=args.backbone)
    model = AdaptedModel(load_model(backbone))
    skip = args.skip_layers
    adapter = AdapterConfig(
        kind=args.kind,
        placement=args.placement,
        r=args.lora_r,
        alpha=2.0 * args.lora_r,
        prefix_length=args.prefix_length,
        skip_layers=skip,
    )
    fused = AdapterConfig(placement=args.placement, skip_layers=skip) if adapter.acts != "slot" else adapter
    sources = [f"source{i}" for i in range(max((k for m, k in configs if m.startswith("fusion")), default=0))]
    for name in sources:
        model.add_adapter(name, fused)
    for method, k in configs:
        if method.startswith(SHARED):
            model.add_adapter(f"{method}{k}", adapter)
        elif method.startswith("fusion"):
            model.add_fusion(f"{method}{k}", sources[:k], FusionConfig(skip_layers=skip))
        if args.head == "lm":  # the LM head a generation task trains (vocabulary-wide, from the embeddings)
            model.add_head(f"{method}{k}", head_type=model.sites.lm, **model.head_options(model.sites.lm))
        else:
            model.add_head(f"{method}{k}", 2)
    with torch.no_grad():  # trained-looking adapters: non-zero up-projections (zero at init)
        for name, param in model.named_parameters():
            if ".adapters." in name and (".up." in name or "lora_B" in name or "W_right" in name):
                param.normal_(std=0.02)
    return model.to(args.device)


def train_loss(model, ids, mask, labels, floor: bool):
    """A training step's forward and loss (compiled as one graph under --compile): the hidden states and the
    cross-entropy of the active head. ``floor``: the bare backbone, backward all the way to the embeddings."""
    import torch

    if floor:
        embeds = model.backbone.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = model.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    else:
        hidden = model.encode(ids, mask)
    logits = model.head_module(hidden, mask).float()  # (B, C), or (B, L, vocab) with --head lm
    return hidden, torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())


def make_step(args, model, method: str, k: int, batch, mode: str = "off"):
    """A function that runs one timed step of this configuration (eager, or compiled in ``mode``) and returns
    (ms, loss or None)."""
    import torch

    from adafuse.fusion.compiling import compiled

    ids, mask, labels = batch
    head = f"{method}{k}"  # the name of this configuration's head, adapter or fusion
    train = method.endswith("train")
    if method == "merged_infer":  # a copy of the model with this adapter folded into its weights
        model = copy.deepcopy(model)
        model.merge_adapter(head)
        what, active = {}, {}
    elif method.startswith(("single", *STRATEGY_STEPS)):
        what, active = {"adapters": [head]}, {"adapters": [head]}
    elif method.startswith("fusion"):
        what, active = {"fusions": [head]}, {"fusion": head}
    else:
        what, active = {}, {}
    model.set_trainable(**what, heads=[head])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if train else None  # as the product trains
    forward_loss = train_loss if mode == "off" else compiled(train_loss, mode)
    autocast = torch.autocast(
        device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"
    )
    cuda = args.device.startswith("cuda")
    strategy = synthetic_strategy(args, model, method, head) if method in STRATEGY_STEPS else None
    rows = {"input_ids": ids, "attention_mask": mask, "labels": labels, "example_index": torch.arange(len(ids))}
    counter = iter(range(10**9))

    phases: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        """With --phases: the ms since ``since`` (after a device synchronisation) under ``name``; the time now."""
        if not args.phases:
            return since
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases[name] = (now - since) * 1000
        return now

    def run():
        if not train:
            model.compile_mode = mode
            with torch.inference_mode(), autocast:
                return model(ids, mask).float().sum().item()
        model.compile_mode = "off"  # the whole step's function is compiled instead
        optimizer.zero_grad(set_to_none=True)
        since = time.perf_counter()
        with autocast:
            hidden, task_loss = forward_loss(model, ids, mask, labels, method == "floor_train")
            if strategy is not None:  # as AdapterTaskModule.training_step
                loss = strategy.loss(model, rows, hidden, task_loss, next(counter))
            else:
                loss = task_loss + model.fusion_regularization()
        since = mark("forward_ms", since)
        loss.backward()
        since = mark("backward_ms", since)
        optimizer.step()
        mark("optimizer_ms", since)
        return loss.item()

    def step():
        model.activate(**active, head=head)
        model.set_trainable(**what, heads=[head])
        model.train(train)
        phases.clear()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = run()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000, value if train else None, dict(phases)

    return step, sum(p.numel() for p in params)


def synthetic_strategy(args, model, method: str, head: str):
    """The strategy of ``method`` in the state it has after ``--old-tasks`` tasks, with made-up contents of
    the true sizes: EWC's F and θ* for every adapter parameter, LwF's recorded outputs of each earlier head
    for every row, replay's class-balanced memory (50 examples of length L per task) and earlier heads."""
    import torch

    from adafuse.continual.strategies import StrategyConfig, strategy_for
    from adafuse.fusion.heads import ClassificationHead

    strategy = strategy_for(method.removesuffix("_train"), StrategyConfig()).to(args.device)
    old = range(args.old_tasks)
    strategy.old_heads = torch.nn.ModuleDict(
        {str(j): ClassificationHead(model.hidden_size, 2, "cls", 0.1).requires_grad_(False) for j in old}
    ).to(args.device)
    model.set_trainable(adapters=[head], heads=[head])
    shared = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")}
    strategy.fisher = {n: torch.rand_like(p) * 1e-3 for n, p in shared.items()}
    strategy.anchors = {n: p.detach().clone() for n, p in shared.items()}
    strategy._params = shared
    strategy.recorded = {str(j): torch.randn(args.batch_size, 2) for j in old}
    g = torch.Generator().manual_seed(1)
    vocab = model.backbone.config.vocab_size

    def example() -> dict:
        return {"input_ids": torch.randint(0, vocab, (args.length,), generator=g).tolist(), "labels": 0}

    strategy.pool = [(j, example()) for j in old for _ in range(50)]
    strategy.replayed = max(1, round(strategy.config.replay_ratio * args.batch_size))
    strategy.seed = 0

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0] * len(ids))}

    strategy.collate = collate
    return strategy


def fixed_batch(args, model):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.backbone.config.vocab_size, (args.batch_size, args.length), generator=g)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g) if args.head != "lm" else ids.roll(-1, 1)
    return ids.to(args.device), torch.ones_like(ids).to(args.device), labels.to(args.device)


def measure(args, configs: list[tuple[str, int]], layout: str) -> list[dict]:
    """Time every configuration, round-robin, in this process; one record each."""
    import torch
    import transformers

    from adafuse.continual.runtime.allocator import tune_malloc

    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    torch.set_num_threads(args.threads)
    model = build(args, configs)
    batch = fixed_batch(args, model)
    modes = ["off"] if args.compile == "off" or layout == "process" else ["off", args.compile]
    configs = [(method, k, mode) for mode in modes for method, k in configs]
    steps = [make_step(args, model, method, k, batch, mode) for method, k, mode in configs]
    times = [[] for _ in configs]
    losses = [[] for _ in configs]
    phases = [[] for _ in configs]
    rounds = args.warmup + (args.steps if layout == "interleaved" else args.rss_steps)
    for i in range(rounds):
        for j in range(len(configs)):
            index = (i + j) % len(configs)  # rotate the order so no configuration always follows the same one
            ms, loss, parts = steps[index][0]()
            if i >= args.warmup:
                times[index].append(ms)
                losses[index].append(loss)
                phases[index].append(parts)
    records = []
    for (method, k, mode), (_, trainable), ms, loss, parts in zip(configs, steps, times, losses, phases, strict=True):
        median = statistics.median(ms)
        split = {name: round(statistics.median(p[name] for p in parts), 3) for name in parts[0]} if parts else {}
        records.append(
            {
                **split,  # --phases: forward_ms, backward_ms, optimizer_ms (medians) of a training step
                "impl": "adafuse",
                "layout": layout,
                "backbone": args.backbone,
                "method": method,
                "K": 0 if method.startswith("floor") else 1 if method.startswith(SHARED) else k,
                "B": args.batch_size,
                "L": args.length,
                "placement": args.placement,
                "kind": args.kind,
                "skip_layers": args.skip_layers,
                "precision": args.precision,
                "compile": mode,
                "malloc": malloc,
                "step_ms_median": round(median, 3),
                "samples_per_s": round(args.batch_size / median * 1000, 3),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
                if layout == "process"
                else None,
                "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                if args.device.startswith("cuda") and layout == "process"
                else None,
                "trainable_params": trainable,
                "total_params": sum(p.numel() for p in model.parameters()),
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "threads": args.threads,
                "step_ms_all": [round(t, 3) for t in ms],
                "loss_first": loss[0],
                "loss_last": loss[-1],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    return records


def plan(args) -> list[tuple[str, int]]:
    runs = []
    for method in args.methods.split(","):
        if method not in METHODS:
            sys.exit(f"speed.py: unknown method '{method}'; expected one of {', '.join(METHODS)}")
        if method == "merged_infer" and args.kind != "lora":
            sys.exit("speed.py: merged_infer needs --kind lora (only weight deltas fold into the weights)")
        ks = [int(k) for k in args.fusion_k.split(",")] if method.startswith("fusion") else [0]
        runs += [(method, k) for k in ks]
    return runs


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's step time / b's step time in the same round (interleaved records)."""
    return statistics.median(x / y for x, y in zip(a["step_ms_all"], b["step_ms_all"], strict=True))


def ratio_table(records: list[dict]) -> str:
    interleaved = [r for r in records if r.get("layout", "interleaved") == "interleaved"]
    modes = list(dict.fromkeys(r.get("compile", "off") for r in interleaved))
    memory = {(r["method"], r["K"]): r for r in records if r.get("layout") == "process"}
    pairs = [
        ("single_train", 1, "floor_train", 0),
        ("single_infer", 1, "floor_fwd", 0),
        ("merged_infer", 1, "floor_fwd", 0),
    ]
    pairs += [(name, 1, "single_train", 1) for name in STRATEGY_STEPS]
    for k in sorted({r["K"] for r in interleaved if r["method"].startswith("fusion")}):
        pairs += [("fusion_train", k, "single_train", 1), ("fusion_infer", k, "single_infer", 1)]
    rows = []
    for mode in modes:
        timed = {(r["method"], r["K"]): r for r in interleaved if r.get("compile", "off") == mode}
        suffix = "" if mode == "off" else f" (compiled, {mode})"
        for method, k, base, base_k in pairs:
            a, b = timed.get((method, k)), timed.get((base, base_k))
            if a and b:
                rows.append((f"{method}{f' K={k}' if k > 1 else ''} / {base}{suffix}", paired_ratio(a, b)))
    eager = {(r["method"], r["K"]): r for r in interleaved if r.get("compile", "off") == "off"}
    for r in interleaved:  # what compiling saves: eager step / compiled step, paired by round
        if r.get("compile", "off") != "off" and (r["method"], r["K"]) in eager:
            k = r["K"]
            name = r["method"] + (f" K={k}" if k > 1 else "")
            rows.append((f"{name} eager / compiled ({r['compile']})", paired_ratio(eager[(r["method"], k)], r)))
    for method, k in sorted(memory):
        if method == "fusion_train" and ("single_train", 1) in memory:
            rss = memory[(method, k)]["peak_rss_mb"] / memory[("single_train", 1)]["peak_rss_mb"]
            rows.append((f"peak RSS fusion_train K={k} / single_train", rss))
            if memory[(method, k)].get("peak_cuda_mb"):
                gpu = memory[(method, k)]["peak_cuda_mb"] / memory[("single_train", 1)]["peak_cuda_mb"]
                rows.append((f"peak GPU memory fusion_train K={k} / single_train", gpu))
    first = (interleaved or records)[0]
    header = (
        f"\n### adafuse speed ratios — {first['backbone']}, B={first['B']}, L={first['L']}, "
        f"{first['device']}, threads={first['threads']}, precision={first['precision']}, "
        f"placement={first['placement']}, kind={first.get('kind', 'bottleneck')}, "
        f"skip_layers={first.get('skip_layers', 0)}, "
        f"malloc={first.get('malloc', 'default')}, "
        f"{len(first['step_ms_all'])} interleaved rounds\n\n| ratio | value |\n|---|---|\n"
    )
    medians = "\n".join(
        f"| {r['method']} K={r['K']}{'' if r.get('compile', 'off') == 'off' else ' compiled'} step ms (median) | "
        f"{r['step_ms_median']:.1f} |"
        for r in interleaved
    )
    medians += "".join(
        f"\n| {m} K={r['K']} peak RSS MB (own process) | {r['peak_rss_mb']:.0f} |" for (m, _), r in memory.items()
    )
    return header + "\n".join(f"| {name} | {value:.3f} |" for name, value in rows) + "\n" + medians + "\n"


def _child(passthrough: list[str], extra: list[str], env: dict) -> list[dict]:
    result = subprocess.run([sys.executable, __file__, *passthrough, *extra], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-2000:])
        raise SystemExit(1)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_interleaved:
        print(json.dumps(measure(args, plan(args), "interleaved")))
        return 0
    if args.child:
        print(json.dumps(measure(args, [(args.child[0], int(args.child[1]))], "process")))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    records = _child(passthrough, ["--child-interleaved"], env)
    for record in records:
        print(
            f"{record['method']:<13} K={record['K']:<3} {record['step_ms_median']:9.1f} ms  "
            f"{record['samples_per_s']:8.1f} samples/s  (interleaved, compile {record['compile']})",
            flush=True,
        )
    if args.rss_steps > 0:
        with ThreadPoolExecutor(max(1, args.memory_jobs)) as pool:  # map keeps the plan's order
            children = [["--child", method, str(k)] for method, k in plan(args)]
            for record in pool.map(lambda child: _child(passthrough, child, env)[0], children):
                records.append(record)
                print(
                    f"{record['method']:<13} K={record['K']:<3} peak RSS {record['peak_rss_mb']:.0f} MB (own process)",
                    flush=True,
                )
    with out.open("a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    table = ratio_table(records)
    print(table)
    with Path(str(out) + ".md").open("a") as handle:
        handle.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
