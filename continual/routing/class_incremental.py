"""Class-incremental evaluation (van de Ven et al. 2022, "Three types of incremental learning"): the task is
not given at test time; an input is classified among every class seen so far.

Task j evaluated after task i uses the artefacts of tasks 0..max(i, j) (task j's untrained ones when j > i,
for FWT and the baseline) and predicts a class of their union:

* isolated adapters: the router (LDA statistics, :mod:`adafuse.continual.routing.lda`, or a router trained on the
  kept examples, :mod:`adafuse.continual.routing.trained`) names a task per input; its adapter and head
  classify it (one routed forward pass per batch). ``task_id_accuracy`` is the share of task j's inputs the
  router sends to task j.
* a shared trainable set (shared adapter, full fine-tuning, EWC, LwF, replay): every seen task's head reads the
  same hidden states and the largest logit over all their classes wins (the heads, concatenated, are one
  growing head).

``oracle_accuracy`` is the same model given the task (task j's own head: the task-incremental number).
"""

from __future__ import annotations

import torch

from adafuse.continual.training.evaluate import scores


def evaluate_class_incremental(method, j: int, i: int, live: bool) -> dict[str, float]:
    """Task j after task i, the task not given: accuracy, macro-F1, oracle and (routed) task-id accuracy."""
    seen = list(range(max(i, j) + 1))
    offsets = [sum(method.tasks[t].num_labels for t in seen[:k]) for k in seen]
    for t in seen:  # every seen task's artefacts in the model, in their state after task i
        method.select(t, i, live)
    model = method.model
    names = [method.name(t) for t in seen]
    router = method.task_router(seen, i) if method.isolated else None
    logits, oracle, labels, routed = [], [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in method.loaders[j]:
                batch = {k: v.to(model.device) for k, v in batch.items()}
                labels.append(batch.pop("labels").cpu() + offsets[j])
                if router is None:  # the shared set is active as select() left it
                    batch_logits, given = _all_heads(model, batch, names, j)
                else:
                    tasks = router(batch)
                    routed.append(tasks)
                    total = offsets[-1] + method.tasks[seen[-1]].num_labels
                    batch_logits = _routed_logits(model, batch, names, tasks, offsets, total)
                    model.activate([names[j]], head=names[j])
                    given = model(**batch).float().argmax(-1).cpu()
                logits.append(batch_logits)
                oracle.append(given + offsets[j])
    finally:
        if router is not None:
            router.close()
        model.train(was_training)
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    result = scores(logits_all, labels_all)
    result["oracle_accuracy"] = float((torch.cat(oracle) == labels_all).float().mean())
    if routed:
        result["task_id_accuracy"] = float((torch.cat(routed) == j).float().mean())
    return result


def _all_heads(model, batch, names: list[str], j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, sum C_t) logits of every seen task's head on the same hidden states, and task j's own prediction."""
    hidden = model.encode(**batch)
    per_task = [model.heads[n](hidden, batch["attention_mask"]).float().cpu() for n in names]
    return torch.cat(per_task, dim=-1), per_task[j].argmax(-1)


def _routed_logits(model, batch, names, tasks, offsets, total: int) -> torch.Tensor:
    """(B, total) logits: each row's routed head's logits at its task's offset, -inf elsewhere."""
    rows = {names[t]: (tasks == t).nonzero().squeeze(1).to(model.device) for t in tasks.unique().tolist()}
    model.route(rows)
    hidden = model.encode(**batch)
    out = torch.full((len(tasks), total), float("-inf"))
    for t in tasks.unique().tolist():
        index = rows[names[t]]
        head = model.heads[names[t]](hidden[index], batch["attention_mask"][index]).float().cpu()
        out[index.cpu(), offsets[t] : offsets[t] + head.shape[-1]] = head
    return out
