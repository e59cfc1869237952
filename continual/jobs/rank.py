"""Which library adapters should a fusion compose? Rank every candidate on the target's training split.

Two transferability proxies, both from one forward pass per source over the target's training examples
(several sources share a pass: the examples are repeated once per source and routed, :meth:`AdaptedModel.route`):

* ``leep`` (Nguyen et al. 2020, "LEEP: a new measure to evaluate transferability of learned
  representations"): the source's own head labels each target example with a distribution theta(x) over
  the source's labels z; the empirical conditional P(y | z) = sum_i theta_z(x_i) [y_i = y] / sum_i theta_z(x_i)
  turns it into a target classifier, and LEEP = mean_i log sum_z P(y_i | z) theta_z(x_i). Higher is better;
  log(1 / C) is what a head unrelated to the target scores. Needs the source's classification head.
* ``probe``: the source's adapted features (pooled as the target's head pools) under a ridge-regression
  classifier to the one-hot target labels, scored by its leave-one-out squared error (closed form:
  e_i = (y_i - yhat_i) / (1 - h_ii)). The score is minus that error, so higher is better.

Only the training split is read: validation chooses between proxies (``benchmarks/library_scale.py``), test
is never seen. Sources without a score for the chosen proxy (no classification head) sort last.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adafuse.continual.config import DEFAULT_TOP_K, RankingConfig
from adafuse.continual.jobs.library_model import add_library_head
from adafuse.fusion.errors import UserError
from adafuse.fusion.heads import pool
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.tasks.datamodule import TaskDataModule
from adafuse.tasks.types import task_type


def leep(probabilities: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """LEEP of (N, Z) source-label probabilities for (N,) target labels in [0, num_labels)."""
    probabilities = probabilities.double()
    joint = F.one_hot(labels, num_labels).double().t() @ probabilities / len(labels)  # (C, Z): P(y, z)
    conditional = joint / joint.sum(0, keepdim=True).clamp_min(1e-12)  # P(y | z)
    expected = (probabilities * conditional[labels]).sum(1)  # (N,): sum_z P(y_i | z) theta_z(x_i)
    return float(expected.clamp_min(1e-12).log().mean())


def probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int, ridge: float = 1.0) -> float:
    """Minus the leave-one-out squared error of ridge regression from (N, d) features to one-hot labels.

    Kernel form (N is small): H = K (K + lambda I)^-1 with K the centred Gram matrix and lambda = ridge x
    mean(diag K), so the penalty follows the features' scale."""
    x = features.double()
    x = x - x.mean(0, keepdim=True)
    y = F.one_hot(labels, num_labels).double()
    y = y - y.mean(0, keepdim=True)
    gram = x @ x.t()  # (N, N)
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-12)
    hat = torch.linalg.solve(gram + penalty * torch.eye(len(x), dtype=x.dtype), gram).t()  # K (K + lambda I)^-1
    residual = (y - hat @ y) / (1 - hat.diagonal()).clamp_min(1e-6).unsqueeze(1)
    return -float(residual.pow(2).sum(1).mean())


@torch.inference_mode()
def score_sources(
    model: AdaptedModel,
    loader,
    sources: list[str],
    heads: dict[str, str | None],
    num_labels: int,
    pooling: str,
    config: RankingConfig,
    progress=None,
) -> dict[str, dict[str, float | None]]:
    """Both proxies for every source (loaded into ``model``; ``heads[source]`` is its classification head in
    ``model`` or None) over the target examples of ``loader``."""
    batches = [{k: v.to(model.device) for k, v in batch.items()} for batch in loader]
    labels = torch.cat([batch["labels"] for batch in batches]).cpu()
    was_training = model.training
    model.eval()
    features = {name: [] for name in sources}
    outputs = {name: [] for name in sources if heads.get(name)}
    try:
        for start in range(0, len(sources), config.group):
            group = sources[start : start + config.group]
            for batch in batches:
                size = len(batch["labels"])
                inputs = {k: v.repeat(len(group), *([1] * (v.dim() - 1))) for k, v in batch.items() if k != "labels"}
                model.route({name: torch.arange(i * size, (i + 1) * size) for i, name in enumerate(group)})
                hidden = model.encode(**inputs)  # (G * B, L, d)
                mask = inputs.get("attention_mask")
                for i, name in enumerate(group):
                    rows = slice(i * size, (i + 1) * size)
                    part_mask = None if mask is None else mask[rows]
                    features[name].append(pool(hidden[rows], part_mask, pooling).float().cpu())
                    if name in outputs:
                        outputs[name].append(
                            model.heads[heads[name]](hidden[rows], part_mask).float().softmax(-1).cpu()
                        )
            if progress is not None:
                progress(len(group))
    finally:
        model.activate()
        model.train(was_training)
    return {
        name: {
            "leep": leep(torch.cat(outputs[name]), labels, num_labels) if name in outputs else None,
            "probe": probe(torch.cat(features[name]), labels, num_labels, config.ridge),
        }
        for name in sources
    }


def rank(scores: dict[str, dict[str, float | None]], proxy: str, top_k: int) -> list[dict]:
    """Sources best first by ``proxy`` (unscored last, ties in library order); the first ``top_k`` are chosen."""
    ranked = sorted(scores, key=lambda name: (scores[name][proxy] is None, -(scores[name][proxy] or 0.0)))
    return [{"name": name, **scores[name], "chosen": place < top_k} for place, name in enumerate(ranked)]


def check_rankable(target) -> None:
    """Both proxies score one label per example: refuse other targets before anything runs or is written."""
    if not task_type(target.type).one_label_per_input:
        raise UserError(
            f"sources: auto ranks sources for targets with one label per example; '{target.name}' is a "
            f"{target.type} task: name its sources instead"
        )


def rank_library(env, library, entries: list[dict], target, config, log=print) -> dict:
    """Rank library ``entries`` as sources for ``target`` (:class:`TaskData`) under fuse ``config``.

    ``env`` holds the bare library backbone (``model``), its ``tokenizer`` and ``fingerprint``. Every candidate
    adapter is loaded (sha256 checked) and stays loaded; the sources' heads are loaded for the pass and removed
    after. Returns ``{"proxy", "top_k", "examples", "max_length", "wall_time_s", "sources": [ranked rows]}``."""
    model, fingerprint, settings = env.model, env.fingerprint, config.ranking
    top_k = config.sources["auto"] if isinstance(config.sources, dict) else DEFAULT_TOP_K
    check_rankable(target)
    started = time.perf_counter()
    heads = {}  # source -> its head in the model, for the sources whose head LEEP can read
    for entry in entries:
        name = entry["name"]
        if name not in model.adapter_configs:
            model.add_adapter(name, AdapterConfig(**entry["config"].get("adapter", {})))
            model.load_adapter_state(name, library.load("adapter", name, fingerprint).tensors)
        head = library.find("head", name)
        head_type = (head or {}).get("config", {}).get("task_type", "classification")
        if head is not None and task_type(head_type).one_label_per_input:
            add_library_head(model, library, fingerprint, name, f"rank@{name}")
            heads[name] = f"rank@{name}"
    short = replace(target, max_length=min(settings.max_length, target.max_length))
    loader = TaskDataModule(short, env.tokenizer, eval_batch_size=settings.batch_size).eval_dataloader("train")
    names = [e["name"] for e in entries]
    log(f"ranking {len(names)} sources on {len(short.splits['train'])} training examples of {target.name}")
    with tqdm(total=len(names), unit=" sources", desc="ranking", disable=None) as bar:
        scores = score_sources(
            model,
            loader,
            names,
            heads,
            target.num_labels,
            model.resolve_pooling(config.head.pooling),
            settings,
            bar.update,
        )
    for head in heads.values():
        del model.heads[head]
    return {
        "proxy": settings.proxy,
        "top_k": top_k,
        "examples": len(short.splits["train"]),
        "max_length": short.max_length,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "sources": rank(scores, settings.proxy, top_k),
    }
