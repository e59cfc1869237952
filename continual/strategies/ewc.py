"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, PNAS, Eq. 3), online (Schwarz et al. 2018, ICML,
"Progress & Compress", §2.4): after task t, the diagonal Fisher information F_t of the shared parameters at
their values θ*_t; while task t+1 trains,

    L(θ) = L_{t+1}(θ) + λ/2 Σ_k F_k (θ_k − θ*_k)²        F ← γ F + F_t (online), θ* ← θ*_t

F_t is the empirical Fisher: the mean over ``fisher_samples`` training examples of the squared gradient of
log p(y | x) with the example's label, one example at a time (the diagonal of E[g gᵀ], not the square of a
batch's mean gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adafuse.continual.strategies import Strategy


def ewc_penalty(
    params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], lam: float
) -> torch.Tensor:
    """λ/2 Σ_k F_k (θ_k − θ*_k)² over the named parameters."""
    total = sum((fisher[n] * (p - anchors[n]).pow(2)).sum() for n, p in params.items())
    return 0.5 * lam * total


def online_fisher(previous: dict[str, torch.Tensor], new: dict[str, torch.Tensor], gamma: float) -> dict:
    """F ← γ F + F_new (the first task: F_new)."""
    return {n: (gamma * previous[n] + f) if n in previous else f.clone() for n, f in new.items()}


def shared_parameters(model, head: str) -> dict[str, torch.Tensor]:
    """The trainable parameters other than the task's head: the shared adapter, or the backbone."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(f"heads.{head}.")}


def diagonal_fisher(model, head: str, examples, collate) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of log p(y | x) (eval mode: no dropout) over ``examples``."""
    params = shared_parameters(model, head)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for example in examples:
            batch = {k: v.to(model.device) for k, v in collate([example]).items()}
            label = batch.pop("labels")
            log_p = F.log_softmax(model(**batch).float(), dim=-1)[0, label[0]]
            grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:
                    fisher[name] += grad.float().pow(2) / len(examples)
    finally:
        model.train(was_training)
    return fisher


class EWC(Strategy):
    stateful = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.Tensor] = {}

    def before_task(self, i: int, method, data) -> None:
        self._params = shared_parameters(method.model, method.name(i))

    def loss(self, model, batch, hidden, task_loss, step):
        if not self.fisher:
            return task_loss
        params = {n: p for n, p in self._params.items() if n in self.fisher}
        if next(iter(self.fisher.values())).device != hidden.device:  # Lightning moved the model after before_task
            self._move(hidden.device)
        return task_loss + ewc_penalty(params, self.anchors, self.fisher, self.config.ewc_lambda)

    def after_task(self, i: int, method, data) -> None:
        data.setup()
        train = data.datasets["train"]
        generator = torch.Generator().manual_seed(self.task_seed(method, i))
        chosen = torch.randperm(len(train), generator=generator)[: self.config.fisher_samples].tolist()
        new = diagonal_fisher(method.model, method.name(i), [train[k] for k in chosen], data.collator)
        self.fisher = online_fisher(self.fisher, new, self.config.ewc_gamma)
        self.anchors = {
            n: p.detach().float().clone() for n, p in shared_parameters(method.model, method.name(i)).items()
        }

    def _move(self, device) -> None:
        self.fisher = {n: f.to(device) for n, f in self.fisher.items()}
        self.anchors = {n: a.to(device) for n, a in self.anchors.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"fisher/{n}": f for n, f in self.fisher.items()},
            **{f"anchor/{n}": a for n, a in self.anchors.items()},
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k.removeprefix("fisher/"): v for k, v in state.items() if k.startswith("fisher/")}
        self.anchors = {k.removeprefix("anchor/"): v for k, v in state.items() if k.startswith("anchor/")}

    def summary(self) -> dict:
        values = sum(f.numel() for f in self.fisher.values())
        return {
            "ewc_lambda": self.config.ewc_lambda,
            "ewc_gamma": self.config.ewc_gamma,
            "fisher_samples": self.config.fisher_samples,
            "extra_memory": f"{2 * values:,} floats (F, θ*)",
        }
