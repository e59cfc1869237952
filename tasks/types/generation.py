"""Generation on a decoder (causal language modelling): a prompt and a target text.

Training sees ``prompt + target + end`` as one sequence and learns the target's tokens only (the prompt's
labels are -100): the loss is the cross-entropy of each target token given everything before it. Evaluation
decodes greedily from the prompt alone (at most ``MAX_NEW_TOKENS`` beyond the longest target in the batch,
stopping at the end token) and scores **exact match** (the generated tokens equal the target's), with the
teacher-forced token accuracy and per-token loss beside it. Only decoders generate (the sites table's ``lm``
is ``causal_lm``): a bidirectional encoder would see the tokens it has to predict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection

from adafuse.fusion.errors import UserError

from ..spec import SplitData, TaskSpec

IGNORE = -100  # prompt and padding positions: no loss
MAX_NEW_TOKENS = 8  # decoding budget beyond the longest target in a batch (predict: --max-new-tokens)


class Generation:
    name = "generation"
    head_type = "causal_lm"
    primary = "exact_match"
    labelled = False  # no label set: targets are free text

    def check_backbone(self, sites, task: str) -> None:
        """Only a causal decoder generates here (T5's seq2seq generation is not built yet)."""
        if sites.lm != "causal_lm":
            found = "an encoder-decoder (seq2seq generation is not built yet)" if sites.lm else "an encoder"
            raise UserError(
                f"task '{task}': generation needs a decoder backbone (gpt2, llama, mistral, qwen2); this one is {found}"
            )

    def columns(self, spec: TaskSpec) -> list[str]:
        return [spec.prompt_column, spec.target_column]

    def row_labels(self, row: dict, spec: TaskSpec) -> list:
        return []

    def split_data(self, rows: list[dict], spec: TaskSpec, index, split: str) -> SplitData:
        for number, row in enumerate(rows):
            for column in (spec.prompt_column, spec.target_column):
                if not isinstance(row[column], str) or (column == spec.target_column and not row[column].strip()):
                    found = "empty" if isinstance(row[column], str) else type(row[column]).__name__
                    raise UserError(
                        f"task '{spec.name}', {split} split, row {number}: column '{column}' must be a non-empty "
                        f"text, found {found}"
                    )
        return SplitData(texts=[r[spec.prompt_column] for r in rows], labels=[r[spec.target_column] for r in rows])

    def encode(self, split: SplitData, tokenizer, max_length: int, cache_dir=None):
        from datasets import Dataset

        end = end_token(tokenizer)
        prompts = tokenizer(list(split.texts), truncation=True, max_length=max_length)["input_ids"]
        targets = tokenizer(list(split.labels), add_special_tokens=False)["input_ids"]
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, target in zip(prompts, targets, strict=True):
            target = target[: max(1, max_length // 2) - 1] + [end]  # half the budget at most; always ends
            prompt = prompt[: max_length - len(target)]
            rows["input_ids"].append(prompt + target)
            rows["attention_mask"].append([1] * (len(prompt) + len(target)))
            rows["labels"].append([IGNORE] * len(prompt) + target)
        return Dataset.from_dict(rows)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on the target tokens: position t predicts token t + 1."""
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    def metrics(self, num_labels: int, prefix: str) -> MetricCollection:
        """Training logs teacher-forced token accuracy (``accuracy``: it picks the best epoch)."""
        return MetricCollection({"accuracy": TokenAccuracy()}, prefix=prefix)

    def metric_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = labels[:, 1:] != IGNORE  # (B, L-1)
        return logits[:, :-1][keep], labels[:, 1:][keep]  # (N, V), (N,)

    def gather(self, model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: exact match of the greedy continuation, correct target tokens, target tokens, loss sum."""
        logits = model(**inputs).float()  # (B, L, V) teacher-forced
        keep = labels[:, 1:] != IGNORE
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp_min(0), reduction="none")
        correct = ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & keep).sum(1)
        prompts, targets = split_rows(inputs["input_ids"], labels)
        generated = greedy(model, prompts, max(map(len, targets)) + MAX_NEW_TOKENS, targets[0][-1])  # end token
        exact = [g == t[:-1] for g, t in zip(generated, targets, strict=True)]  # without the end token
        stats = torch.stack([torch.tensor(exact, device=labels.device), correct, keep.sum(1), (losses * keep).sum(1)])
        return stats.t().float().cpu(), torch.zeros(len(labels))

    def scores(self, stats: torch.Tensor, _: torch.Tensor, label_names: list[str]) -> dict[str, float]:
        exact, correct, count, loss = stats.sum(0).tolist()
        exact_match = exact / len(stats)
        return {
            "score": exact_match,
            "exact_match": exact_match,
            "token_accuracy": correct / max(count, 1),
            "loss_per_token": loss / max(count, 1),
        }

    @torch.no_grad()
    def predict(self, model, tokenizer, texts: list, tasks: list[str], max_length: int, skip_layers: int, names):
        """Greedy continuations (at most ``MAX_NEW_TOKENS`` tokens); one decoding per task among the rows."""
        results: list[dict | None] = [None] * len(texts)
        groups: dict[str, list[int]] = {}
        for row, task in enumerate(tasks):
            groups.setdefault(task, []).append(row)
        for task, members in groups.items():
            prompts = tokenizer([str(texts[r]) for r in members], truncation=True, max_length=max_length)["input_ids"]
            model.route({task: torch.arange(len(members), device=model.device)}, skip_layers=skip_layers)
            generated = greedy(model, prompts, MAX_NEW_TOKENS, end_token(tokenizer), head=task)
            for row, ids in zip(members, generated, strict=True):
                results[row] = {"generated": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids)}
        return results


class TokenAccuracy(Metric):
    """Share of the (N,) targets that the (N, V) logits' argmax names (no class count needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += (logits.argmax(-1) == target).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp_min(1)


def end_token(tokenizer) -> int:
    """The token that ends a target: the tokenizer's eos, else its sep (BERT vocabularies)."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise UserError(f"generation: tokenizer {type(tokenizer).__name__} has neither an eos nor a sep token")
    return end


def split_rows(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt (the positions before its first label) and target (its labelled tokens, end included)."""
    prompts, targets = [], []
    for ids, row in zip(input_ids.tolist(), labels.tolist(), strict=True):
        start = next(i for i, label in enumerate(row) if label != IGNORE)
        prompts.append(ids[:start])
        targets.append([label for label in row[start:] if label != IGNORE])
    return prompts, targets


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, end: int, head: str | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt, batched (left-padded, explicit positions), stopping at ``end``;
    ``head``: the LM head that reads the hidden states (default: the model's active head).

    Every step runs the whole sequence again (no key/value cache): simple, exact, and cheap at the lengths
    tasks here use. Returns the generated ids without the end token."""
    device = model.device
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        hidden = model.encode(ids, mask, position_ids=positions)  # (B, L, d)
        following = model.heads[head or model.active_head](hidden[:, -1:])[:, -1].argmax(-1)  # (B,)
        for row in (~done).nonzero().squeeze(1).tolist():
            if following[row].item() != end:
                out[row].append(following[row].item())
        done |= following == end
        if done.all():
            break
        ids = torch.cat([ids, following.unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(following).unsqueeze(1)], 1)
    return out
