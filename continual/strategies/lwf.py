"""Learning without Forgetting (Li & Hoiem 2017, TPAMI, §3): before task t trains, record the current model's
outputs y_o on task t's training inputs for every earlier task's head (Algorithm 1, "record responses"); while
task t trains, keep those heads' outputs close to the record:

    L = L_new + λ_o Σ_o L_old(y_o, ŷ_o)        L_old = −Σ_c y'_c log ŷ'_c,  y' = softmax(y / T), ŷ' = softmax(ŷ / T)

(Eq. 2, T = 2 in the paper). The earlier heads stay frozen here (the library keeps each task's head as it
finished), so the distillation acts on the shared parameters alone. Training batches carry each example's
index into the training split (``example_index``), which finds its recorded outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from adafuse.continual.strategies import Strategy

INDEX = "example_index"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of −Σ_c softmax(teacher / T)_c log softmax(student / T)_c (Li & Hoiem 2017, Eq. 2)."""
    target = F.softmax(teacher.float() / temperature, dim=-1)
    return -(target * F.log_softmax(student.float() / temperature, dim=-1)).sum(-1).mean()


@torch.inference_mode()
def record_outputs(model, heads: dict, dataset, collate, batch_size: int) -> dict[str, torch.Tensor]:
    """Each head's logits (N, C) on every example of ``dataset``, in order, with what the model has active."""
    was_training = model.training
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in heads}
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(model.device) for k, v in batch.items() if k not in ("labels", INDEX)}
            hidden = model.encode(**batch)
            for name, head in heads.items():
                outputs[name].append(head(hidden, batch.get("attention_mask")).float().cpu())
    finally:
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in outputs.items()}


class LwF(Strategy):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.recorded: dict[str, torch.Tensor] = {}

    def before_task(self, i: int, method, data) -> None:
        self.keep_heads(method, range(i))
        data.setup()
        train = data.datasets["train"]
        if INDEX not in train.column_names:
            data.datasets["train"] = train = train.add_column(INDEX, list(range(len(train))))
        batch_size = method.config.trainer.eval_batch_size
        self.recorded = record_outputs(method.model, dict(self.old_heads.items()), train, data.collator, batch_size)

    def loss(self, model, batch, hidden, task_loss, step):
        if not self.recorded:
            return task_loss
        rows = batch[INDEX].cpu()
        mask = batch.get("attention_mask")
        old = [
            distillation_loss(
                head(hidden, mask), self.recorded[name][rows].to(hidden.device), self.config.lwf_temperature
            )
            for name, head in self.old_heads.items()
        ]
        return task_loss + self.config.lwf_alpha * torch.stack(old).sum()

    def summary(self) -> dict:
        values = sum(r.numel() for r in self.recorded.values())
        return {
            "lwf_alpha": self.config.lwf_alpha,
            "lwf_temperature": self.config.lwf_temperature,
            "extra_memory": f"{values:,} floats (recorded outputs, last task)",
        }
