"""Task identification for an adapter library: which task's adapter and head should read an input.

A nearest-class-mean router on the bare backbone's features (Rebuffi et al. 2017, iCaRL §2.1's classifier,
here choosing a task instead of a class): after task t trains, the mean of the L2-normalised, mean-pooled
last hidden states of its training examples, per class, is stored in the library beside the task's adapter
(kind ``router``, C_t × d floats: no examples are kept). An input goes to the task owning the class mean with
the highest cosine similarity:

    task(x) = owner(argmax_c  <f(x), mu_c>)        f(x) = normalise(mean_l h_l(x)),  mu_c = normalise(mean f)

The features come from the backbone without any adapter, so they never change as tasks are added: the
router of task t is fixed when task t finishes, like its adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adafuse.fusion.model import AdaptedModel


@torch.inference_mode()
def bare_features(model: AdaptedModel, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) normalised mean-pooled features of the bare backbone and (N,) labels over ``loader``."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        with model.bare_backbone():
            for batch in loader:
                batch = {k: v.to(model.device) for k, v in batch.items()}
                labels.append(batch.pop("labels").cpu())
                features.append(pooled(model.encode(**batch), batch["attention_mask"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unpadded positions, L2-normalised: (B, L, d) -> (B, d)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp_min(1), dim=-1).float()


def class_means(features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(C, d) normalised mean feature of each class (a class without examples: zeros, never chosen first)."""
    sums = torch.zeros(num_labels, features.shape[1]).index_add_(0, labels, features)
    return F.normalize(sums, dim=-1)


def identify(features: torch.Tensor, prototypes: list[torch.Tensor]) -> torch.Tensor:
    """(N,) index into ``prototypes`` (one (C_t, d) tensor per task) of the task whose class mean is nearest."""
    owners = torch.cat([torch.full((len(p),), t) for t, p in enumerate(prototypes)])
    return owners[(features @ torch.cat(prototypes).t()).argmax(-1)]
