"""Does adafuse's fusion *train* as AdapterHub's does? Gradients and a short training trajectory, side by side.

    python benchmarks/fusion_gradients.py --peer-python /path/to/peer/bin/python --out runs/fusion-gradients.jsonl

The fixtures' AdapterHub fusion (``../shared/fixtures/adapterhub``: two Pfeiffer sources, a dynamic fusion and
its head, all perturbed) loads on both sides: adafuse imports it, the peer (``adapters`` 1.3.0 in its own
environment, as ``benchmarks/fusion_peer.py`` sets up) loads it with ``load_adapter_fusion``. On the fixtures'
four texts with fixed labels, in eval mode (no dropout, so both sides compute the same function):

* **gradients**: cross-entropy plus the value regulariser, one backward; every trainable tensor's gradient
  (the fusion's query, key and value in each layer, the head) compared, the largest difference against the
  largest gradient;
* **trajectory**: 40 steps of AdamW at lr 1e-3 with the gradient norm clipped at 1, the loss of every step and
  the weights at the end. The peer runs its ``AdapterTrainer``'s order: the regulariser's gradient is computed
  in ``on_step_end``, after the optimizer step and ``zero_grad``, so it lands in the *next* step's gradient
  (and its clipping). adafuse runs its own order (the regulariser in the loss) and the peer's order, so the
  record shows both the arithmetic's agreement and what the order changes.

One JSON record per comparison goes to ``--out``; a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "adapterhub"
LABELS = [0, 1, 2, 0]
STEPS, LR, CLIP = 40, 1e-3, 1.0


def _batch(fixtures: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    expected = json.loads((fixtures / "expected_logits.json").read_text())
    ids, mask = torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"])
    return ids, mask, torch.tensor(LABELS)


def _train(params: list[torch.Tensor], loss_fn, reg_fn, order: str) -> list[float]:
    """AdamW with clipping; ``order`` 'in-loss' adds the regulariser to the loss, 'after-step' backpropagates it
    after the step and zero_grad (AdapterHub's callback), into the next step's gradient."""
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn()
        (loss + reg_fn() if order == "in-loss" else loss).backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if order == "after-step":
            reg_fn().backward()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- the peer's side (runs in the peer's venv)


def peer_child(fixtures: Path, model_dir: str, out: Path) -> None:
    from adapters import AutoAdapterModel
    from adapters.composition import Fuse
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AutoAdapterModel.from_pretrained(model_dir)
    for name in ("task_a", "task_b"):
        model.load_adapter(str(fixtures / name), load_as=name, with_head=False, use_safetensors=True)
    model.load_adapter_fusion(str(fixtures / "fusion_task_a_task_b"), with_head=True, use_safetensors=True)
    setup = Fuse("task_a", "task_b")
    model.train_adapter_fusion(setup)
    model.set_active_adapters(setup)
    model.active_head = "task_a,task_b"
    model.eval()
    ids, mask, labels = _batch(fixtures)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)

    def reg_fn():
        return model.base_model.get_fusion_regularization_loss()

    (loss_fn() + reg_fn()).backward()
    save_file({n: p.grad.contiguous() for n, p in named.items()}, str(out / "gradients.safetensors"))
    for p in named.values():
        p.grad = None
    losses = _train(list(named.values()), loss_fn, reg_fn, "after-step")
    save_file({n: p.detach().contiguous() for n, p in named.items()}, str(out / "trained.safetensors"))
    (out / "losses.json").write_text(json.dumps(losses))


# ---------------------------------------------------------------- adafuse's side


def _adafuse_model(fixtures: Path):
    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.formats.adapterhub_read import read_adapter_folder, read_fusion_folder
    from adafuse.fusion.model import AdaptedModel

    model = AdaptedModel(load_model(BackboneConfig()))
    for folder in ("task_a", "task_b"):
        imported = read_adapter_folder(fixtures / folder, model.site_paths)
        model.add_adapter(imported["name"], imported["config"])
        model.load_adapter_state(imported["name"], imported["tensors"])
    fusion = read_fusion_folder(fixtures / "fusion_task_a_task_b", model.site_paths)
    model.add_fusion(fusion["name"], fusion["sources"], fusion["config"])
    model.load_fusion_state(fusion["name"], fusion["tensors"])
    model.add_head(fusion["name"], fusion["head"]["num_labels"])
    model.load_head_state(fusion["name"], fusion["head"]["tensors"])
    model.activate(fusion=fusion["name"], head=fusion["name"])
    model.set_trainable(fusions=[fusion["name"]], heads=[fusion["name"]])
    model.eval()
    return model, fusion["name"]


def _as_adafuse(peer_file: Path, fixtures: Path, model, fusion: str) -> tuple[dict, dict]:
    """The peer's tensors (AdapterHub names) under adafuse's names, through the importer's own key mapping:
    a copy of the fixture fusion folder whose weights are replaced by the peer's tensors."""
    from safetensors.torch import load_file, save_file

    from adafuse.fusion.formats.adapterhub_read import read_fusion_folder

    tensors = load_file(str(peer_file))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "fusion_task_a_task_b"
        folder.mkdir()
        for name in ("adapter_fusion_config.json", "head_config.json"):
            (folder / name).write_text((fixtures / "fusion_task_a_task_b" / name).read_text())
        save_file(
            {k: v for k, v in tensors.items() if not k.startswith("heads.")},
            str(folder / "model_adapter_fusion.safetensors"),
        )
        save_file({k: v for k, v in tensors.items() if k.startswith("heads.")}, str(folder / "model_head.safetensors"))
        read = read_fusion_folder(folder, model.site_paths)
    return read["tensors"], read["head"]["tensors"]


def _ours(model, fusion: str) -> tuple[dict, dict]:
    """adafuse's trainable tensors keyed as its fusion state and head state are (the importer's names)."""
    fusion_params = {
        f"{index}.{location}.{key}": value
        for index, location, slot in model.slots()
        if fusion in slot.fusions
        for key, value in slot.fusions[fusion].named_parameters()
    }
    return fusion_params, dict(model.heads[fusion].named_parameters())


def compare(ours: dict, theirs: dict) -> dict:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:4]
    diffs = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    worst = max(diffs, key=diffs.get)
    others = max((v for k, v in diffs.items() if not k.endswith("key.bias")), default=0.0)
    scale = max(theirs[k].abs().max().item() for k in theirs)
    return {"tensors": len(ours), "max_abs_difference": diffs[worst], "worst_tensor": worst,
            "max_abs_difference_without_key_bias": others, "max_abs_value": scale}  # fmt: skip


def run(peer_python: str, out: Path) -> list[dict]:
    from adafuse.fusion.backbone import embedded_model_dir

    fixtures = FIXTURES.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        command = [peer_python, __file__, "--child", str(work), "--model-dir", str(embedded_model_dir())]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": ""})
        peer_losses = json.loads((work / "losses.json").read_text())
        model, fusion = _adafuse_model(fixtures)
        grads_fusion, grads_head = _as_adafuse(work / "gradients.safetensors", fixtures, model, fusion)
        trained_fusion, trained_head = _as_adafuse(work / "trained.safetensors", fixtures, model, fusion)
    ids, mask, labels = _batch(fixtures)

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(ids, mask), labels)

    records = []
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    fusion_params, head_params = _ours(model, fusion)
    params = [*fusion_params.values(), *head_params.values()]
    (loss_fn() + model.fusion_regularization()).backward()
    for what, ours, theirs in (("fusion", fusion_params, grads_fusion), ("head", head_params, grads_head)):
        # None: a gradient that is zero by construction (the key's bias adds the same score to every source)
        got = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in ours.items()}
        records.append({"comparison": f"gradient, {what}", "order": "-"} | compare(got, theirs))
    for order in ("after-step", "in-loss"):
        model.load_state_dict(initial)
        for p in params:
            p.grad = None
        losses = _train(params, loss_fn, model.fusion_regularization, order)
        loss_gap = max(abs(a - b) for a, b in zip(losses, peer_losses, strict=True))
        for what, ours, theirs in (("fusion", fusion_params, trained_fusion), ("head", head_params, trained_head)):
            got = {n: p.detach() for n, p in ours.items()}
            record = {"comparison": f"weights after {STEPS} steps, {what}", "order": order} | compare(got, theirs)
            records.append(record | {"max_loss_difference": loss_gap, "final_loss": losses[-1],
                                     "peer_final_loss": peer_losses[-1]})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", help="python of an environment with adapters==1.3.0")
    parser.add_argument("--out", type=Path, default=Path("runs/fusion-gradients.jsonl"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer_child(FIXTURES.resolve(), args.model_dir, args.child)
        return 0
    if not args.peer_python:
        print("fusion_gradients.py: --peer-python is required (an environment with adapters==1.3.0)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    records = run(args.peer_python, args.out)
    print("| comparison | order | tensors | max abs difference | max abs value | loss difference |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['comparison']} | {r['order']} | {r['tensors']} | {r['max_abs_difference']:.2e} | "
              f"{r['max_abs_value']:.2e} | {r.get('max_loss_difference', float('nan')):.2e} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
