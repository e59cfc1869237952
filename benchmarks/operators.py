"""Operators a step dispatches, per transformer block: the frozen floor, one adapter of each kind and fusion.

On a GPU at small and medium sizes every operator costs its launch whatever its size, so the number of operators
a block runs is the step's cost there. A ``TorchDispatchMode`` counts every ATen operator that one training step
(forward + loss + backward, no optimizer) and one inference step dispatch; the table gives them per block (the
step's count divided by the number of blocks) and what each configuration adds per block over the frozen floor.

    .venv/bin/python benchmarks/operators.py                      # tiny BERT, B 2, L 8 (the counts do not depend on
    .venv/bin/python benchmarks/operators.py --out runs/ops.jsonl   # the sizes, only on the architecture and code)

``tests/test_operators.py`` keeps the counts from growing.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("bottleneck", "parallel", "compacter", "lora", "prefix")
CONFIGURATIONS = ["floor", *(f"single-{kind}" for kind in KINDS), "fusion-2", "fusion-8"]


class OperatorCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while it is active (forward and, on the CPU, the backward too)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def build(backbone: str, configuration: str):
    """The adapted model of one configuration, its adapters with non-zero up-projections (as after training)."""
    from adafuse.continual.config import load_config
    from adafuse.fusion.attention import FusionConfig
    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.kinds import AdapterConfig
    from adafuse.fusion.model import AdaptedModel

    torch.manual_seed(0)
    model = AdaptedModel(load_model(load_config(BackboneConfig, backbone)))
    what, active = {}, {}
    if configuration.startswith("single-"):
        model.add_adapter("a", AdapterConfig(kind=configuration.split("-", 1)[1], reduction_factor=4, prefix_length=4))
        what, active = {"adapters": ["a"]}, {"adapters": ["a"]}
    elif configuration.startswith("fusion-"):
        sources = [f"s{i}" for i in range(int(configuration.split("-")[1]))]
        for name in sources:
            model.add_adapter(name, AdapterConfig(reduction_factor=4))
        model.add_fusion("f", sources, FusionConfig())
        what, active = {"fusions": ["f"]}, {"fusion": "f"}
    model.add_head("h", 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name and (".up." in name or "lora_B" in name or "W_right" in name):
                param.normal_(std=0.02)
    model.activate(**active, head="h")
    model.set_trainable(**what, heads=["h"])
    return model


def count(model, configuration: str, batch_size: int, length: int, train: bool) -> int:
    """Operators of one step (after one warm-up step, so that memoised weight products are in place)."""
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(3, vocab, (batch_size, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = torch.zeros(batch_size, dtype=torch.long)

    def step():
        if not train:
            with torch.inference_mode():
                return model(ids, mask)
        model.zero_grad(set_to_none=True)
        if configuration == "floor":  # backward all the way to the (frozen) embeddings, as speed.py's floor
            embeds = model.backbone.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        else:
            hidden = model.encode(ids, mask)
        logits = model.heads["h"](hidden, mask)
        loss = torch.nn.functional.cross_entropy(logits, labels) + model.fusion_regularization()
        loss.backward()

    model.train(train)
    step()
    with OperatorCounter() as counter:
        step()
    return counter.total


def measure(backbone: str, batch_size: int, length: int, only: str = "") -> list[dict]:
    """Every configuration (or those whose name starts with ``only``), training and inference steps."""
    records = []
    for configuration in (c for c in CONFIGURATIONS if c.startswith(only)):
        model = build(backbone, configuration)
        config = model.backbone.config
        blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
        for train in (True, False):
            total = count(model, configuration, batch_size, length, train)
            records.append(
                {"configuration": configuration, "step": "train" if train else "infer", "operators": total,
                 "blocks": blocks, "per_block": round(total / blocks, 1), "backbone": backbone}
            )  # fmt: skip
    return records


def table(records: list[dict]) -> str:
    floor = {r["step"]: r["operators"] for r in records if r["configuration"] == "floor"}
    lines = ["| configuration | training step: per block | over the floor, per block | inference: per block | over the "
             "floor, per block |", "|---|---|---|---|---|"]  # fmt: skip
    by_name = collections.defaultdict(dict)
    for r in records:
        by_name[r["configuration"]][r["step"]] = r
    for name, steps in by_name.items():
        cells = []
        for step in ("train", "infer"):
            r = steps[step]
            cells += [f"{r['per_block']:.1f}", f"{(r['operators'] - floor[step]) / r['blocks']:+.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=str(ROOT / "configs" / "backbone" / "tiny-bert.yaml"))
    parser.add_argument("-B", "--batch-size", type=int, default=2)
    parser.add_argument("-L", "--length", type=int, default=8)
    parser.add_argument("--out", default=None, help="JSONL of records")
    args = parser.parse_args(argv)
    records = measure(args.backbone, args.batch_size, args.length)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
