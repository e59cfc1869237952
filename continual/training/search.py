"""Gradient-free search of a weighted composition's weights (LoraHub's setting: Huang et al. 2024 learn the
K weights with a derivative-free optimiser on the few-shot examples; here a (1 + lambda) evolution strategy
with the 1/5th success rule, Rechenberg 1973).

A candidate w is scored on the target's training split only: the hidden states under the composition w are
pooled as the target's head pools them, a ridge-regression classifier is fitted to them in closed form
(the new head has no weights to search over), and the score is its cross-entropy plus the L1 penalty
l1 * sum_n |w_n|. The best w is kept; the head is then trained by gradient with w frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adafuse.fusion.heads import pool
from adafuse.fusion.model import AdaptedModel


@torch.no_grad()
def search_weights(
    model: AdaptedModel,
    name: str,
    head: str,
    loader,
    iterations: int = 15,
    population: int = 8,
    sigma: float = 0.5,
    seed: int = 0,
    ridge: float = 1e-2,
    log=print,
) -> list[float]:
    """Set composition ``name``'s weights to the best candidate found and return them."""
    composition = next(slot.fusions[name] for _, _, slot in model.slots() if name in slot.fusions)
    weights, l1 = composition.weights, composition.config.l1  # one weight vector, shared by every slot
    pooling = model.heads[head].pooling
    batches = [{k: v.to(model.device) for k, v in b.items()} for b in loader]  # the batches move, not the model
    labels = torch.cat([b.pop("labels") for b in batches])
    targets = F.one_hot(labels, model.heads[head].num_labels).to(weights.dtype)  # (N, C)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    model.activate(fusion=name, head=head)

    def score(candidate: torch.Tensor) -> float:
        weights.copy_(candidate)
        features = torch.cat([pool(model.encode(**b), b["attention_mask"], pooling) for b in batches])  # (N, d)
        x = torch.cat([features, torch.ones_like(features[:, :1])], 1)  # (N, d + 1): a bias column
        gram = x.t() @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
        logits = x @ torch.linalg.solve(gram, x.t() @ targets)  # (N, C)
        return F.cross_entropy(logits, labels).item() + l1 * candidate.abs().sum().item()

    best, best_score = weights.detach().clone(), score(weights.detach().clone())
    for iteration in range(iterations):
        candidates = best + sigma * torch.randn(population, len(best), generator=generator, dtype=best.dtype)
        scores = [score(c) for c in candidates]
        winner = min(range(population), key=scores.__getitem__)
        successes = sum(s < best_score for s in scores) / population
        sigma *= 1.5 if successes > 0.2 else 0.8  # 1/5th success rule
        if scores[winner] < best_score:
            best, best_score = candidates[winner].clone(), scores[winner]
        log(f"search {iteration + 1}/{iterations}: best score {best_score:.4f}, sigma {sigma:.3f}")
    weights.copy_(best)
    return best.tolist()
