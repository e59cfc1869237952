"""Greedy decoding with and without the key/value cache: tokens per second and identical outputs.

    python benchmarks/decoding.py --backbone configs/backbone/minilm-size-gpt2.yaml --setups adapter,fusion \
        -B 1,8 --prompt 64 --new 32 --repeat 3 --out runs/decoding.jsonl

A random-init backbone (speed does not depend on the weights' values) with one bottleneck adapter (``adapter``)
or a fusion over four (``fusion``) and a language-modelling head, every weight perturbed so that nothing is the
identity. Each batch of ``-B`` prompts of ``--prompt`` random tokens decodes ``--new`` tokens (no end token, so
every row decodes the whole budget) with :func:`adafuse.tasks.types.generation.decode`, cached and uncached
interleaved, ``--repeat`` times each; the median goes in the record with the speed-up and whether the two gave
the same tokens. One JSONL record per measurement; a Markdown table on stdout and in ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adafuse.continual.config import load_config
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.backbone import BackboneConfig, load_model
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.tasks.types.generation import decode


def build(backbone: Path, setup: str) -> AdaptedModel:
    model = AdaptedModel(load_model(load_config(BackboneConfig, str(backbone))))
    sources = ["s0", "s1", "s2", "s3"] if setup == "fusion" else ["a"]
    for name in sources:
        model.add_adapter(name, AdapterConfig(reduction_factor=16))
    if setup == "fusion":
        model.add_fusion("f", sources, FusionConfig())
    model.add_head("lm", head_type=model.sites.lm)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    model.activate(**({"fusion": "f"} if setup == "fusion" else {"adapters": sources}), head="lm")
    model.requires_grad_(False)  # as predict and serve load them: frozen (the fusion's inference maps memoised)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=Path, default=Path("configs/backbone/minilm-size-gpt2.yaml"))
    parser.add_argument("--setups", default="adapter,fusion")
    parser.add_argument("-B", default="1,8", help="rows per batch, comma-separated")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="tokens decoded per row")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/decoding.jsonl"))
    args = parser.parse_args()
    records = []
    for setup in args.setups.split(","):
        model = build(args.backbone, setup)
        vocab = model.backbone.config.vocab_size
        for rows in (int(b) for b in args.B.split(",")):
            prompts = torch.randint(1000, vocab, (rows, args.prompt), generator=torch.Generator().manual_seed(rows))
            prompts = prompts.tolist()
            times: dict[bool, list[float]] = {True: [], False: []}
            outputs = {}
            for _ in range(args.repeat):
                for cache in (True, False):
                    start = time.perf_counter()
                    outputs[cache] = decode(model, prompts, args.new, end=-1, cache=cache)
                    times[cache].append(time.perf_counter() - start)
            tokens = rows * args.new
            cached, plain = (statistics.median(times[c]) for c in (True, False))
            records.append(
                {
                    "backbone": args.backbone.stem,
                    "setup": setup,
                    "B": rows,
                    "prompt": args.prompt,
                    "new": args.new,
                    "cached_tokens_per_s": tokens / cached,
                    "uncached_tokens_per_s": tokens / plain,
                    "speedup": plain / cached,
                    "same_tokens": outputs[True] == outputs[False],
                    "threads": torch.get_num_threads(),
                }
            )
            print(json.dumps(records[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = ["| setup | B | prompt | new | cached tokens/s | uncached tokens/s | speed-up | same tokens |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in records:
        lines.append(
            f"| {r['setup']} | {r['B']} | {r['prompt']} | {r['new']} | {r['cached_tokens_per_s']:.1f} | "
            f"{r['uncached_tokens_per_s']:.1f} | {r['speedup']:.2f} × | {r['same_tokens']} |"
        )
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
