"""Task identification by a router trained on kept examples (``router.kind: trained``).

After task t of a class-incremental run with isolated adapters, a router adapter and a head over every class
of tasks 0..t are trained from scratch on those tasks' training examples, which the run keeps (like replay,
this stores user data: the run's own training splits). An input goes to the task that owns the router's
best class; that task's adapter and head then classify it. The router is stored with task t's router
statistics in the library (``trained.adapter.*``, ``trained.head.*``; the owners of its classes in the entry's
config) and replaced by the next task's: it is the one artefact that changes as tasks are added, and the task
adapters it routes to never do.

The training loop is plain PyTorch (it runs inside the finished task's Lightning callbacks): AdamW, linear
warm-up and decay, gradient clipping at 1.0, mixed batches drawn from all kept tasks in a seeded order, the
global random state left as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adafuse.fusion.model import AdaptedModel

ROUTER = "router@trained"  # the router's adapter and head while it is in the model
TOKENS = ("input_ids", "attention_mask", "token_type_ids")


def kept_examples(datasets: list, offsets: list[int]) -> list[dict]:
    """Every training example of each task, its label moved to the task's offset in the union of classes."""
    examples = []
    for dataset, offset in zip(datasets, offsets, strict=True):
        for example in dataset:
            kept = {key: example[key] for key in TOKENS if key in example}
            examples.append({**kept, "labels": int(example["labels"]) + offset})
    return examples


def train_router(
    model: AdaptedModel,
    examples: list[dict],
    collate,
    num_classes: int,
    adapter_config,
    head_config,
    trainer_config,
    router_config,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Train a fresh router adapter + head on ``examples`` for ``router_config.epochs`` at ``router_config.lr``
    (default ``trainer_config.lr``); returns their tensors (the model is left without them)."""
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        install(model, adapter_config, head_config, num_classes)
        model.set_trainable(adapters=(ROUTER,), heads=(ROUTER,))
        model.activate([ROUTER], head=ROUTER)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = router_config.learning_rate(trainer_config)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=trainer_config.weight_decay)
        size = trainer_config.batch_size
        epochs = router_config.epochs
        steps = epochs * -(-len(examples) // size)
        warmup = max(1, round(trainer_config.warmup_ratio * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
        )
        generator = torch.Generator().manual_seed(seed)
        model.train()
        bar = tqdm(total=steps, desc="training the router", unit=" steps", leave=False, disable=None)
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), size):
                rows = collate([examples[k] for k in order[start : start + size]])
                batch = {k: v.to(model.device) for k, v in rows.items()}
                labels = batch.pop("labels")
                loss = F.cross_entropy(model(**batch).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, trainer_config.gradient_clip_val or float("inf"))
                optimizer.step()
                schedule.step()
                bar.update()
        bar.close()
        model.eval()
        tensors = {f"trained.adapter.{k}": v for k, v in model.adapter_state(ROUTER).items()}
        tensors |= {f"trained.head.{k}": v for k, v in model.head_state(ROUTER).items()}
        uninstall(model)
        model.set_trainable()  # the task's training is over: nothing trains until the next task sets its own
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def install(model: AdaptedModel, adapter_config, head_config, num_classes: int, tensors: dict | None = None) -> None:
    """Put a router adapter + head into ``model`` (replacing one there), with ``tensors`` if given."""
    uninstall(model)
    model.add_adapter(ROUTER, adapter_config)
    model.add_head(ROUTER, num_classes, head_config.pooling, head_config.dropout)
    if tensors is not None:
        model.load_adapter_state(ROUTER, _part(tensors, "trained.adapter."))
        model.load_head_state(ROUTER, _part(tensors, "trained.head."))


def uninstall(model: AdaptedModel) -> None:
    model.activate()
    if ROUTER in model.adapter_configs:
        model.delete_adapter(ROUTER)
    if ROUTER in model.heads:
        del model.heads[ROUTER]


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def stored_router(entry: dict | None) -> dict:
    """The trained-router config of a library ``router`` entry: ``{}`` for LDA statistics alone or no entry."""
    return (entry or {}).get("config", {}).get("router", {})


class TrainedRouter:
    """Routes a batch with a trained router: (B,) index of the task owning each row's best class."""

    def __init__(self, model: AdaptedModel, tensors, owners: list[int], adapter_config, head_config) -> None:
        self.model = model
        self.owners = torch.tensor(owners)
        install(model, adapter_config, head_config, len(owners), tensors)
        model.eval()

    @torch.inference_mode()
    def __call__(self, batch: dict) -> torch.Tensor:
        self.model.activate([ROUTER], head=ROUTER)
        return self.owners[self.model(**batch).float().argmax(-1).cpu()]

    def close(self) -> None:
        uninstall(self.model)
