"""Generation: a prompt and a target text, on a decoder (causal LM) or an encoder-decoder (T5, seq2seq LM).

The data are stored neutrally: the prompt's token ids and the target's (end token appended) as ``labels``.
:meth:`Generation.model_batch` lays a batch out for the backbone (the sites table's ``lm``):

* ``causal_lm`` (GPT-2, Llama, ...): one sequence ``prompt + target`` per row; position t is scored against
  token t + 1, and only the target's tokens count (the prompt's labels are -100);
* ``seq2seq_lm`` (T5): the encoder reads the prompt, the decoder reads the target shifted right behind the
  decoder start token, and every target token counts.

So the loss is one token-level cross-entropy on either layout. Evaluation decodes greedily from the prompt
alone (at most ``MAX_NEW_TOKENS`` beyond the longest target in the batch, stopping at the end token) and
scores **exact match** (the generated tokens equal the target's), with the teacher-forced token accuracy and
per-token loss beside it. Encoders do not generate: they would see the tokens they have to predict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from adafuse.fusion.errors import UserError
from adafuse.tasks.spec import SplitData, TaskSpec
from adafuse.tasks.types.base import TaskType, group_rows

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

IGNORE = -100  # prompt and padding positions: no loss
MAX_NEW_TOKENS = 8  # decoding budget beyond the longest target in a batch


class Generation(TaskType):
    name = "generation"
    head_type = "causal_lm"  # on a decoder; T5 takes seq2seq_lm (see head_for)
    primary = "exact_match"
    labelled = False  # no label set: targets are free text

    def check_backbone(self, sites, task: str) -> None:
        if sites.lm is None:
            raise UserError(
                f"task '{task}': generation needs a decoder or encoder-decoder backbone (gpt2, llama, mistral, "
                f"qwen2, t5); this one is an {'image model' if sites.inputs == 'pixels' else 'encoder'}"
            )

    def head_for(self, sites) -> str:
        return sites.lm

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

    def example(self, prompt: str, target: str, label_names: list[str]) -> dict:
        return {"prompt": prompt, "target": target}

    def encode(self, split: SplitData, tokenizer, max_length: int, cache_dir=None):
        """Prompt ids (``input_ids``) and target ids + end (``labels``); together at most ``max_length``."""
        from datasets import Dataset

        end = end_token(tokenizer)
        prompts = tokenizer(list(split.texts), truncation=True, max_length=max_length)["input_ids"]
        targets = tokenizer(list(split.labels), add_special_tokens=False)["input_ids"]
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, target in zip(prompts, targets, strict=True):
            target = target[: max(1, max_length // 2) - 1] + [end]  # half the budget at most; always ends
            prompt = prompt[: max_length - len(target)]
            rows["input_ids"].append(prompt)
            rows["attention_mask"].append([1] * len(prompt))
            rows["labels"].append(target)
        return Dataset.from_dict(rows)

    def check_padding(self, pad_to_multiple_of: int | None, task: str) -> None:
        if pad_to_multiple_of is not None:  # the batch is laid out again per architecture in model_batch
            raise UserError(
                f"trainer.pad_to_multiple_of: task '{task}' is a generation task, whose batches are laid out per "
                "architecture (prompt + target); leave it unset (null)"
            )

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return PairCollator(tokenizer.pad_token_id)

    def model_batch(self, model, batch: dict) -> tuple[dict, torch.Tensor]:
        """The backbone's layout of a batch and the (B, L) labels each position is scored against."""
        return LAYOUTS[model.sites.lm](model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def metrics(self, num_labels: int, prefix: str) -> MetricCollection:
        """Training logs teacher-forced token accuracy (``accuracy``: it picks the best epoch)."""
        from adafuse.tasks.types.metrics import token_metrics

        return token_metrics(prefix)

    def metric_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = labels != IGNORE
        return logits[keep], labels[keep]  # (N, V), (N,)

    def gather(self, model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: exact match of the greedy continuation, correct target tokens, target tokens, loss sum."""
        laid_out, aligned = self.model_batch(model, {**inputs, "labels": labels})
        logits = model(**laid_out).float()  # (B, L, V) teacher-forced
        keep = aligned != IGNORE
        losses = F.cross_entropy(logits.transpose(1, 2), aligned.clamp_min(0), reduction="none")  # (B, L)
        correct = ((logits.argmax(-1) == aligned) & keep).sum(1)
        prompts = [
            ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
        ]
        targets = [row[row != IGNORE].tolist() for row in labels]
        generated = decode(model, prompts, max(map(len, targets)) + MAX_NEW_TOKENS, targets[0][-1])  # end token
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
        for task, members in group_rows(tasks).items():
            prompts = tokenizer([str(texts[r]) for r in members], truncation=True, max_length=max_length)["input_ids"]
            model.route({task: torch.arange(len(members), device=model.device)}, skip_layers=skip_layers)
            generated = decode(model, prompts, MAX_NEW_TOKENS, end_token(tokenizer), head=task)
            for row, ids in zip(members, generated, strict=True):
                results[row] = {"generated": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids)}
        return results


class PairCollator:
    """Pads prompts (``pad_id``, mask 0) and targets (-100) of a batch, each to its own longest."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": _padded([e["input_ids"] for e in examples], self.pad_id),
            "attention_mask": _padded([e["attention_mask"] for e in examples], 0),
            "labels": _padded([e["labels"] for e in examples], IGNORE),
        }


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row)
    return out


def causal_layout(model, input_ids, attention_mask, labels) -> tuple[dict, torch.Tensor]:
    """``prompt + target`` per row (right-padded); position t is scored against token t + 1 of the target."""
    sequences, aligned = [], []
    for ids, mask, target in zip(input_ids, attention_mask, labels, strict=True):
        prompt, target = ids[mask.bool()], target[target != IGNORE]
        sequences.append(torch.cat([prompt, target]).tolist())
        aligned.append([IGNORE] * (len(prompt) - 1) + target.tolist() + [IGNORE])
    ids = _padded(sequences, 0).to(input_ids.device)
    mask = _padded([[1] * len(s) for s in sequences], 0).to(input_ids.device)
    return {"input_ids": ids, "attention_mask": mask}, _padded(aligned, IGNORE).to(input_ids.device)


def seq2seq_layout(model, input_ids, attention_mask, labels) -> tuple[dict, torch.Tensor]:
    """The encoder reads the prompt; the decoder reads the target shifted right behind the start token."""
    start = model.backbone.config.decoder_start_token_id
    pad = model.backbone.config.pad_token_id or 0
    shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], 1)  # (B, L)
    shifted = shifted.masked_fill(shifted == IGNORE, pad)  # positions past a row's target: scored -100 anyway
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": shifted}, labels


LAYOUTS = {"causal_lm": causal_layout, "seq2seq_lm": seq2seq_layout}


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


def decode(
    model, prompts: list[list[int]], max_new_tokens: int, end: int, head: str | None = None, cache: bool = True
) -> list[list[int]]:
    """Greedy continuation of each prompt on the backbone's layout, stopping at ``end`` (which it leaves out);
    ``head``: the LM head that reads the hidden states (default: the model's active head). With ``cache`` the
    keys and values of the positions already read are kept (transformers' KV cache), so every step after the
    first reads one new token per row; without it every step reads the whole sequence again. Both give the
    same tokens: every adapter kind and the fusion act on each position alone."""
    cache = cache and not _prefix_active(model)
    return DECODERS[model.sites.lm](model, prompts, max_new_tokens, end, head or model.active_head, cache)


def _prefix_active(model) -> bool:
    """An active prefix adapter's slot reads its keys and values without a cache (the BERT family's layout)."""
    return any(location == "prefix" and not slot.is_bare for _, location, slot in model.slots())


@torch.no_grad()
def greedy_causal(
    model, prompts: list[list[int]], max_new_tokens: int, end: int, head: str, cache: bool = True
) -> list[list[int]]:
    """Batched greedy decoding on a decoder: prompts left-padded, positions counted from each row's first token;
    with ``cache``, each step feeds only the positions the key/value cache has not read yet."""
    from transformers import DynamicCache

    width = max(map(len, prompts))
    ids = _padded([[0] * (width - len(p)) + p for p in prompts], 0).to(model.device)  # (B, L)
    mask = _padded([[0] * (width - len(p)) + [1] * len(p) for p in prompts], 0).to(model.device)
    past = DynamicCache(config=model.backbone.config) if cache else None

    def following(state):  # (B,) the most likely next token of every row
        ids, mask = state
        seen, options = _cache_options(past)
        positions = (mask.cumsum(1) - 1).clamp_min(0)[:, seen:]
        hidden = model.encode(ids[:, seen:], mask, position_ids=positions, **options)  # (B, L - seen, d)
        return model.heads[head](hidden[:, -1:])[:, -1].argmax(-1)

    def extend(state, tokens):
        ids, mask = state
        return torch.cat([ids, tokens.unsqueeze(1)], 1), torch.cat([mask, torch.ones_like(tokens).unsqueeze(1)], 1)

    return _greedy(following, extend, (ids, mask), len(prompts), max_new_tokens, end)


@torch.no_grad()
def greedy_seq2seq(
    model, prompts: list[list[int]], max_new_tokens: int, end: int, head: str, cache: bool = True
) -> list[list[int]]:
    """Batched greedy decoding on an encoder-decoder: the encoder reads the (right-padded) prompts once, the
    decoder grows from the start token (with ``cache`` it reads only the newest token at each step)."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    ids = _padded(prompts, model.backbone.config.pad_token_id or 0).to(model.device)  # (B, L)
    mask = _padded([[1] * len(p) for p in prompts], 0).to(model.device)
    start = torch.full((len(prompts), 1), model.backbone.config.decoder_start_token_id, device=model.device)
    narrow = model.backbone.get_input_embeddings().weight.dtype  # encode() widens; cross-attention reads these
    encoded = BaseModelOutput(last_hidden_state=model.encode(ids, mask).to(narrow))  # (B, L, d), read every step
    past = EncoderDecoderCache(DynamicCache(), DynamicCache()) if cache else None

    def following(decoded):
        seen, options = _cache_options(past)
        hidden = model.encode(None, mask, decoder_input_ids=decoded[:, seen:], encoder_outputs=encoded, **options)
        return model.heads[head](hidden[:, -1:])[:, -1].argmax(-1)

    def extend(decoded, tokens):
        return torch.cat([decoded, tokens.unsqueeze(1)], 1)

    return _greedy(following, extend, start, len(prompts), max_new_tokens, end)


def _cache_options(past) -> tuple[int, dict]:
    """(positions the cache holds, the keyword arguments that make the backbone read and extend it)."""
    if past is None:
        return 0, {"use_cache": False}
    return past.get_seq_length(), {"cache": past, "use_cache": True}


def _greedy(following, extend, state, rows: int, max_new_tokens: int, end: int) -> list[list[int]]:
    """The decoding loop both layouts share: append each unfinished row's next token until ``end`` or budget."""
    out: list[list[int]] = [[] for _ in range(rows)]
    done = None
    for _ in range(max_new_tokens):
        tokens = following(state)  # (B,)
        done = torch.zeros_like(tokens, dtype=torch.bool) if done is None else done
        for row in (~done).nonzero().squeeze(1).tolist():
            if tokens[row].item() != end:
                out[row].append(tokens[row].item())
        done |= tokens == end
        if done.all():
            break
        state = extend(state, tokens)
    return out


DECODERS = {"causal_lm": greedy_causal, "seq2seq_lm": greedy_seq2seq}
