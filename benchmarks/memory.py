"""Memory and step time of a frozen backbone at real sizes: float32, bfloat16 weights, bfloat16 with activation
checkpointing, int8 and nf4 weights, with one bottleneck adapter, one LoRA adapter or a fusion over four.

    python benchmarks/memory.py --sizes qwen2.5-0.5b,tiny --variants float32,bfloat16,bfloat16+checkpointing,int8 \
        --setups adapter,fusion -B 4 -L 512 --steps 1 --work runs/memory --out runs/memory.jsonl

Each size is a random-init Llama-family config with its model's published config.json values (speed and memory
do not depend on the weights' values), saved once in float32 under ``--work`` so that every variant loads it as
a user loads a checkpoint: straight into its dtype (``backbone.dtype``) or quantized (``backbone.quantization``).
Every (size, variant, setup) runs in a fresh process: load, add the adapter (or four sources and a fusion) and a
classification head, then ``--steps`` timed training steps (AdamW, B × L random tokens) after one warm-up step.
The record holds the peak RSS of loading (``load_peak_rss_mb``: loading a narrower dtype from this float32 file
maps the file's pages as it converts them; a checkpoint published in bfloat16 does not), the peak of the training
steps (``peak_rss_mb``: Linux's VmHWM, started afresh after loading) and the median step time; float32
weights, which safetensors maps from the file, are read once after loading, so that they are resident as a
narrower dtype's converted weights are. ``step_start_rss_mb`` is the RSS as the last step begins (weights, the
trained tensors and their AdamW moments): what the step adds above it is mostly what the forward pass keeps for
the backward pass. The model's share of the memory is the steps' peak minus the same
variant's on the ``tiny`` config; what activation checkpointing saves is the difference between the peaks of a
variant with and without it. ``bfloat16+float32-copies`` is ``bfloat16`` with the float32 copies of norms and
adapter inputs kept for the backward pass, as autograd alone keeps them: what :mod:`adafuse.fusion.narrow` saves.

``float32+fsdp2`` and ``bfloat16+fsdp2`` shard the backbone as ``trainer.strategy: fsdp`` does, over 2 processes
(torchrun, gloo on the CPU, NCCL on CUDA), each with B × L tokens of its own and the trained gradients
all-reduced as DDP does; the record holds the busier process's figures (its ``loaded_rss_mb`` after sharding).

Peak RSS also counts freed memory that malloc keeps for reuse. ``--malloc exact`` has every block mmap'd and
returned when freed, so the peak follows the live tensors (what a CUDA peak counts); ``--malloc adafuse`` sets
the thresholds ``adafuse`` commands run with; ``--malloc glibc`` (the default) leaves glibc's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

SIZES = {  # published config.json values (Hugging Face model cards)
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, head_dim=64,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048,
    ),
}  # fmt: skip
VARIANTS = {  # backbone.dtype, backbone.quantization, activation checkpointing
    "float32": ("float32", "none", False),
    "bfloat16": ("bfloat16", "none", False),
    "bfloat16+checkpointing": ("bfloat16", "none", True),
    "float32+checkpointing": ("float32", "none", True),
    "bfloat16+float32-copies": ("bfloat16", "none", False),  # what autograd alone keeps (adafuse.fusion.narrow off)
    "int8": ("bfloat16", "int8", False),
    "nf4": ("bfloat16", "nf4", False),
    "nf4+checkpointing": ("bfloat16", "nf4", True),  # QLoRA's recipe: 4-bit weights, gradient checkpointing
    "float32+fsdp2": ("float32", "none", False),  # +fsdp2: 2 processes, each holding half the frozen weights
    "bfloat16+fsdp2": ("bfloat16", "none", False),
}
SHARDED = "+fsdp2"
SETUPS = ("adapter", "lora", "fusion", "fusion-qk")
FUSION_SETUPS = {"fusion": {}, "fusion-qk": {"value": False}}  # fusion-qk: no W_V (fusion.value: false)


MALLOC = {  # glibc's environment tunables per --malloc choice
    "glibc": {},
    "adafuse": {},  # the child calls adafuse.continual.runtime.allocator.tune_malloc()
    "exact": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
}


def saved(work: Path, size: str, dtype: str = "float32") -> Path:
    """The size's random-init model, saved once in ``dtype`` (float32 unless a size is too large for it: an 8B
    model is 32 GB of float32, and published 8B checkpoints are bfloat16)."""
    folder = work / (size if dtype == "float32" else f"{size}-{dtype}")
    if not (folder / "config.json").is_file():
        from adafuse.fusion.backbone import BackboneConfig, load_model

        load_model(BackboneConfig(random_init=SIZES[size], dtype=dtype)).save_pretrained(folder)
    return folder


def refuse_unknown(parser: argparse.ArgumentParser, *options: tuple[str, str, Iterable[str]]) -> None:
    """``parser.error`` (one line, exit 2) for a comma-separated option (flag, its value, the names it takes)
    naming what it does not know."""
    for flag, names, known in options:
        unknown = [name for name in names.split(",") if name not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (expected some of {', '.join(known)})")


def child(folder: Path, variant: str, setup: str, batch: int, length: int, steps: int, device: str) -> dict:
    import torch

    from adafuse.fusion.attention import FusionConfig
    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.kinds import AdapterConfig
    from adafuse.fusion.model import AdaptedModel

    dtype, quantization, checkpointing = VARIANTS[variant]
    if variant.endswith("+float32-copies"):
        _keep_float32_copies()
    backbone = BackboneConfig(name=str(folder), dtype=dtype, quantization=quantization)
    model = AdaptedModel(load_model(backbone, device if device != "cpu" else None))
    fusion = setup in FUSION_SETUPS
    sources = ["s0", "s1", "s2", "s3"] if fusion else ["a"]
    kind = AdapterConfig(kind="lora", r=16) if setup == "lora" else AdapterConfig(reduction_factor=16)
    for name in sources:
        model.add_adapter(name, kind)
    if fusion:
        model.add_fusion("f", sources, FusionConfig(**FUSION_SETUPS[setup]))
    model.add_head("h", 2)
    model.activate(**({"fusion": "f"} if fusion else {"adapters": sources}), head="h")
    model.set_trainable(**({"fusions": ["f"]} if fusion else {"adapters": sources}), heads=["h"])
    model.set_activation_checkpointing(checkpointing)
    model.to(device).train()
    with torch.no_grad():  # float32 weights stay mapped from the safetensors file until read: make them resident
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.sum()
    load_peak = _status_mb("VmHWM:")
    sharded = variant.endswith(SHARDED)
    if sharded:
        _shard(model, device)
    loaded_mb = _rss_mb()
    _reset_peak()  # from here VmHWM is the training steps' peak (loading a float32 file maps its pages first)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.backbone.config.vocab_size, (batch, length), generator=generator).to(device)
    mask, labels = torch.ones_like(ids), torch.zeros(batch, dtype=torch.long, device=device)
    times, step_start = [], _rss_mb()
    try:
        for _ in range(1 + steps):
            step_start = _rss_mb()  # the last step's: weights, trained tensors and AdamW's moments, before a forward
            times.append(_step(model, optimizer, (ids, mask, labels), sharded, device))
    except torch.OutOfMemoryError:  # a result too (does it fit this card?): the peak up to the failed allocation
        times = []
    peak = _status_mb("VmHWM:")
    cuda = {"peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if device != "cpu" else {}
    if sharded:  # the busiest process's figures
        loaded_mb, load_peak, peak, step_start = (max(_all_ranks(v)) for v in (loaded_mb, load_peak, peak, step_start))
        cuda = {k: max(_all_ranks(v)) for k, v in cuda.items()}
    step_s = round(statistics.median(times[1:] or times), 3) if times else None  # None: out of memory
    return {"loaded_rss_mb": round(loaded_mb, 1), "load_peak_rss_mb": round(load_peak, 1),
            "peak_rss_mb": round(peak, 1), "step_start_rss_mb": round(step_start, 1), **cuda, "device": device,
            "trained_parameters": sum(p.numel() for p in trained), "step_s": step_s, "out_of_memory": not times,
            "threads": torch.get_num_threads()}  # fmt: skip


def _step(model, optimizer, batch, sharded: bool, device: str) -> float:
    """One training step (forward, backward, AdamW); its seconds."""
    import torch

    ids, mask, labels = batch
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
    loss.backward()
    if sharded:  # DDP's all-reduce of what trains
        for param in optimizer.param_groups[0]["params"]:
            if param.grad is not None:  # the fusion's key bias gets none (it cancels in the softmax)
                torch.distributed.all_reduce(param.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _shard(model, device: str) -> None:
    """``trainer.strategy: fsdp``'s sharding over the torchrun process group (gloo on the CPU)."""
    import gc

    import torch
    import torch.distributed as dist

    from adafuse.continual.runtime.sharding import shard_backbone

    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    shard_backbone(model, torch.device(device))
    gc.collect()


def _all_ranks(value: float) -> list[float]:
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _keep_float32_copies() -> None:
    """Switch off :mod:`adafuse.fusion.narrow`: norms and slots keep their float32 copies, as autograd alone does."""
    import adafuse.fusion.narrow as narrow

    def plain(function, *args):
        return function(*args)

    narrow.recompute_in_backward = plain


def _rss_mb() -> float:
    return _status_mb("VmRSS:")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Start VmHWM (the peak RSS) afresh at the current RSS (Linux: /proc/self/clear_refs, 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="qwen2.5-0.5b,tiny", help=f"comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--variants", default="float32,bfloat16,bfloat16+checkpointing,int8")
    parser.add_argument(
        "--setups", default="adapter,fusion",
        help="adapter (bottleneck), lora, fusion (K 4), fusion-qk (K 4 without W_V: fusion.value false)",
    )  # fmt: skip
    parser.add_argument(
        "--saved-dtype", default="float32", help="the dtype the random-init checkpoint is saved in (bfloat16 at 8B)"
    )
    parser.add_argument("-B", type=int, default=4)
    parser.add_argument("-L", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step (0: time that one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then the peak CUDA memory is recorded too)")
    parser.add_argument("--work", type=Path, default=Path("runs/memory"))
    parser.add_argument("--out", type=Path, default=Path("runs/memory.jsonl"))
    parser.add_argument(
        "--malloc", choices=list(MALLOC), default="glibc",
        help="glibc: its defaults; adafuse: the thresholds `adafuse` commands set; exact: every block mmap'd and "
        "returned when freed, so RSS follows the live tensors (as a CUDA peak does)",
    )  # fmt: skip
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, variant, setup = args.child
        if args.malloc == "adafuse":
            from adafuse.continual.runtime.allocator import tune_malloc

            tune_malloc()
        record = child(Path(folder), variant, setup, args.B, args.L, args.steps, args.device)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(record))
        return 0
    refuse_unknown(parser, ("--setups", args.setups, SETUPS), ("--variants", args.variants, VARIANTS))
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")  # a record per run as it ends (a step limit keeps what ended); the shares at the end
    for size in args.sizes.split(","):
        folder = saved(args.work, size, args.saved_dtype)
        for setup in args.setups.split(","):
            for variant in args.variants.split(","):
                launcher = [sys.executable]
                if variant.endswith(SHARDED):  # --standalone: a rendezvous on localhost, on a port free at the time
                    launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                command = [*launcher, __file__, "--child", str(folder), variant, setup]
                command += ["-B", str(args.B), "-L", str(args.L), "--steps", str(args.steps), "--device", args.device]
                command += ["--malloc", args.malloc]
                env = {**os.environ, **MALLOC[args.malloc]}
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                if result.returncode != 0:
                    raise SystemExit(f"{size} {variant} {setup} failed:\n{result.stderr[-3000:]}")
                record = {"size": size, "variant": variant, "setup": setup, "B": args.B, "L": args.L}
                record["malloc"] = args.malloc
                records.append(record | json.loads(result.stdout.strip().splitlines()[-1]))
                print(json.dumps(records[-1]), flush=True)
                with args.out.open("a") as out:
                    out.write(json.dumps(records[-1]) + "\n")
    tiny = {(r["variant"], r["setup"]): r["peak_rss_mb"] for r in records if r["size"] == "tiny"}
    for record in records:  # the training steps' peak, less the same run's on the tiny config
        if (record["variant"], record["setup"]) in tiny:
            record["model_share_mb"] = round(record["peak_rss_mb"] - tiny[(record["variant"], record["setup"])], 1)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [
        "| size | setup | variant | B | L | loading's peak RSS MB | steps' peak RSS MB | model share MB "
        "| peak CUDA MB | step s |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        lines.append(
            f"| {r['size']} | {r['setup']} | {r['variant']} | {r['B']} | {r['L']} | {r['load_peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r.get('model_share_mb', '–')} | {r.get('peak_cuda_mb', '–')} | "
            f"{'out of memory' if r['out_of_memory'] else format(r['step_s'], '.2f')} |"
        )
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
