"""LoRA training steps: adafuse against HF PEFT on the same frozen backbone, interleaved in one process.

    python benchmarks/peft_lora.py --sizes qwen2.5-0.5b --dtype bfloat16 -B 4 -L 512 --rounds 5 \
        --work runs/memory --out runs/peft-lora.jsonl

Both sides train the same LoRA (rank 16, alpha 32, on the same projections: q and v unless ``--targets`` says
otherwise) on the same random-init checkpoint (``benchmarks/memory.py``'s sizes, saved once under ``--work``),
loaded in the same ``--dtype`` (and ``--quantization``: adafuse's torchao int8 or nf4 projections on both sides,
PEFT's LoRA layers wrapping them), with the same classification head (adafuse's, dropout 0, over the last token) and
AdamW over what trains. adafuse's LoRA is written to a PEFT folder through ``library export --to peft``'s path and
PEFT loads it (``PeftModel.from_pretrained``, trainable), so both start from the same weights; before timing, the
record holds the largest difference between their hidden states (``max_hidden_difference``) beside what the LoRA
delta changes in them (``max_lora_delta``). Each round times one adafuse step and one PEFT
step (forward, cross-entropy, backward, AdamW step), alternating which goes first; the record holds each side's
median step, tokens per second and adafuse's throughput over PEFT's. On CUDA every step is synchronised and the
peak memory of each side's step is recorded (both models are resident, so compare the two, not their sum).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _sibling(name: str):
    """Another script of this folder (not a package), loaded from its file: its sizes and saved checkpoints."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory = _sibling("memory")
TARGETS = ("q", "k", "v", "ffn_in", "ffn_out")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="qwen2.5-0.5b", help=f"comma-separated, of {', '.join(memory.SIZES)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--quantization", default="none", choices=["none", "int8", "nf4"],
        help="the frozen weights quantized through torchao, the same projections on both sides",
    )  # fmt: skip
    p.add_argument("--targets", default="q,v", help=f"projections with a LoRA delta, of {', '.join(TARGETS)}")
    p.add_argument("-r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("-B", type=int, default=4)
    p.add_argument("-L", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each side per round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--saved-dtype", default="float32", help="the dtype the random-init checkpoint is saved in")
    p.add_argument("--work", type=Path, default=Path("runs/memory"))
    p.add_argument("--out", type=Path, default=Path("peft-lora.jsonl"))
    args = p.parse_args(argv)
    memory.refuse_unknown(p, ("--sizes", args.sizes, memory.SIZES), ("--targets", args.targets, TARGETS))
    return args


def build(folder: Path, args):
    """adafuse's model with its LoRA and head, and PEFT's on a second copy of the backbone with the same LoRA
    weights (through the export path) and a copy of the head."""
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from adafuse.fusion.backbone import DTYPES, BackboneConfig, load_model
    from adafuse.fusion.formats.peft import peft_files
    from adafuse.fusion.kinds import AdapterConfig
    from adafuse.fusion.model import AdaptedModel
    from adafuse.fusion.quantize import quantize

    device = None if args.device == "cpu" else args.device
    backbone = BackboneConfig(name=str(folder), dtype=args.dtype, quantization=args.quantization)
    ours = AdaptedModel(load_model(backbone, device))
    lora = AdapterConfig(kind="lora", r=args.r, alpha=args.alpha, target_modules=args.targets.split(","))
    ours.add_adapter("a", lora)
    ours.add_head("h", 2, dropout=0.0, pooling="last")
    torch.manual_seed(0)
    with torch.no_grad():  # B is zero at init: a trained-looking delta, so that the comparison below means something
        for name, param in ours.named_parameters():
            if ".adapters.a." in name:
                param.normal_(std=0.02)
    ours.activate(adapters=["a"], head="h")
    ours.set_trainable(adapters=["a"], heads=["h"])
    ours.to(args.device).train()
    with tempfile.TemporaryDirectory() as exported:
        for name, data in peft_files(lora, ours.adapter_state("a"), ours.site_paths, str(folder)).items():
            Path(exported, name).write_bytes(data)
        on_device = {"device_map": args.device} if device is not None else {}  # loaded (and quantized) there
        base = AutoModel.from_pretrained(folder, dtype=DTYPES[args.dtype], **on_device)
        quantize(base, args.quantization)  # the same quantized projections as adafuse's backbone
        theirs = PeftModel.from_pretrained(base, exported, is_trainable=True).to(args.device)
    theirs.train()
    head = copy.deepcopy(ours.heads["h"]).to(args.device)
    return ours, theirs, head


def steps(ours, theirs, head, args):
    """One timed training step of each side (a function returning its ms), their trained parameter counts, and
    the largest hidden-state difference between the two before any step (and what the LoRA delta changes)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, ours.backbone.config.vocab_size, (args.B, args.L), generator=generator).to(args.device)
    mask, labels = torch.ones_like(ids), torch.zeros(args.B, dtype=torch.long, device=args.device)
    with torch.no_grad():
        hidden = theirs(input_ids=ids, attention_mask=mask)[0].float()
        difference = float((ours.encode(ids, mask).float() - hidden).abs().max())
        with theirs.disable_adapter():  # what the delta changes: the comparison above means something
            delta = float((theirs(input_ids=ids, attention_mask=mask)[0].float() - hidden).abs().max())
    cuda = args.device.startswith("cuda")

    def timed(forward, trained):
        optimizer = torch.optim.AdamW(trained, lr=1e-4)

        def step() -> dict:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(forward().float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - started) * 1000
            return {"ms": ms, **({"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {})}

        return step

    def peft_forward():  # widened for the float32 head, as adafuse's encode() hands it
        return head(theirs(input_ids=ids, attention_mask=mask)[0].float(), mask)

    ours_trained = [p for p in ours.parameters() if p.requires_grad]
    theirs_trained = [p for p in theirs.parameters() if p.requires_grad] + list(head.parameters())
    sides = {"adafuse": timed(lambda: ours(ids, mask), ours_trained), "peft": timed(peft_forward, theirs_trained)}
    trained = {"adafuse": sum(p.numel() for p in ours_trained), "peft": sum(p.numel() for p in theirs_trained)}
    return sides, trained, {"max_hidden_difference": difference, "max_lora_delta": delta}


def measure(size: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = memory.saved(args.work, size, args.saved_dtype)
    ours, theirs, head = build(folder, args)
    sides, trained, checks = steps(ours, theirs, head, args)
    runs: dict[str, list[dict]] = {"adafuse": [], "peft": []}
    for round_ in range(args.warmup + args.rounds):
        order = ["adafuse", "peft"] if round_ % 2 == 0 else ["peft", "adafuse"]
        for side in order:
            result = sides[side]()
            if round_ >= args.warmup:
                runs[side].append(result)
    tokens = args.B * args.L
    record = {"size": size, "dtype": args.dtype, "quantization": args.quantization, "targets": args.targets,
              "r": args.r, "B": args.B, "L": args.L,
              "device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds,
              **checks}  # fmt: skip
    for side, results in runs.items():
        ms = statistics.median(r["ms"] for r in results)
        record[f"{side}_trained_parameters"] = trained[side]
        record[f"{side}_step_ms"] = round(ms, 2)
        record[f"{side}_tokens_per_s"] = round(tokens / ms * 1000, 1)
        if results and "peak_cuda_mb" in results[0]:
            record[f"{side}_step_peak_cuda_mb"] = round(max(r["peak_cuda_mb"] for r in results), 1)
    record["throughput_over_peft"] = round(record["peft_step_ms"] / record["adafuse_step_ms"], 3)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    for size in args.sizes.split(","):
        record = measure(size, args)
        print(json.dumps(record), flush=True)
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
