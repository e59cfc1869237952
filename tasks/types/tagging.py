"""Tagging (token classification, NER-style): a list of words and one tag per word.

Tags are aligned to sub-words as BERT's NER recipe does: the first sub-word of each word carries the word's
tag, the other sub-words and the special tokens carry -100 and are left out of the loss and the metrics.
Words cut off by ``max_length`` are not scored. The primary metric is entity-level F1 under the CoNLL-2000
rules (``conlleval``): an entity is a maximal chunk of one type, started and ended as :func:`entities`
says; an entity counts as correct only when its start, end and type all match. Token accuracy is beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adafuse.fusion.errors import UserError
from adafuse.tasks.spec import SplitData, TaskSpec
from adafuse.tasks.types.base import TaskType
from adafuse.tasks.types.classification import one_pass

IGNORE = -100  # the label of sub-words and special tokens: no loss, no metric
PREFIXES = ("B", "I", "E", "S")  # BIO / BIOES prefixes ("B-PER"); other tags are plain (IO: "PER")


class Tagging(TaskType):
    name = "tagging"
    head_type = "tagging"
    primary = "entity_f1"

    def columns(self, spec: TaskSpec) -> list[str]:
        return [spec.tokens_column, spec.tags_column]

    def row_labels(self, row: dict, spec: TaskSpec) -> list:
        tags = row[spec.tags_column]
        return list(tags) if isinstance(tags, list) else []

    def split_data(self, rows: list[dict], spec: TaskSpec, index, split: str) -> SplitData:
        words, tags = [], []
        for number, row in enumerate(rows):
            where = f"{split} split, row {number}"
            tokens, labels = row[spec.tokens_column], row[spec.tags_column]
            if not isinstance(tokens, list) or not isinstance(labels, list):
                raise UserError(
                    f"task '{spec.name}', {where}: '{spec.tokens_column}' and '{spec.tags_column}' must be lists"
                )
            if len(tokens) != len(labels):
                raise UserError(
                    f"task '{spec.name}', {where}: {len(tokens)} words in '{spec.tokens_column}' but "
                    f"{len(labels)} tags in '{spec.tags_column}'"
                )
            if not tokens:
                raise UserError(f"task '{spec.name}', {where}: '{spec.tokens_column}' is empty")
            words.append(["" if w is None else str(w) for w in tokens])
            tags.append([index(t, f"{where}, column '{spec.tags_column}'") for t in labels])
        return SplitData(texts=words, labels=tags)

    def example(self, words: list[str], tags: list[int], label_names: list[str]) -> dict:
        return {"tokens": words, "tags": [label_names[t] for t in tags]}

    def encode(self, split: SplitData, tokenizer, max_length: int, cache_dir=None):
        from datasets import Dataset

        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"tagging needs a fast tokenizer (word ids); {type(tokenizer).__name__} is not one")
        encoded = tokenizer(split.texts, is_split_into_words=True, truncation=True, max_length=max_length)
        labels = [align(encoded.word_ids(row), tags) for row, tags in enumerate(split.labels)]
        return Dataset.from_dict({**encoded, "labels": labels})

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(
            tokenizer, label_pad_token_id=IGNORE, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)  # (B*L, C), (B*L,)

    def metric_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = labels != IGNORE
        return logits[keep], labels[keep]  # (N, C), (N,): the scored words

    def metrics(self, num_labels: int, prefix: str):
        """Training logs token accuracy and macro-F1 over the scored words."""
        from adafuse.tasks.types.metrics import label_metrics

        return label_metrics(num_labels, prefix)

    def gather(self, model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) predicted tags of the scored words and (N, 2) their gold tags and sentence-start flags."""
        logits = model(**inputs)  # (B, L, C)
        keep = labels != IGNORE  # (B, L)
        first = keep & (keep.long().cumsum(1) == 1)  # each sentence's first scored word
        return logits.argmax(-1)[keep].cpu(), torch.stack([labels[keep], first[keep].long()], 1).cpu()

    def scores(self, predicted: torch.Tensor, gold: torch.Tensor, label_names: list[str]) -> dict[str, float]:
        from adafuse.tasks.types.metrics import accuracy

        starts = gold[:, 1].nonzero().squeeze(1).tolist() + [len(gold)]
        spans = list(zip(starts, starts[1:], strict=False))  # one (start, end) per sentence
        pred_sentences = [[label_names[i] for i in predicted[a:b].tolist()] for a, b in spans]
        gold_sentences = [[label_names[i] for i in gold[a:b, 0].tolist()] for a, b in spans]
        f1 = entity_f1(pred_sentences, gold_sentences)
        share = accuracy(predicted, gold[:, 0], len(label_names))
        return {"score": f1, "entity_f1": f1, "token_accuracy": share}

    def predict(self, model, tokenizer, texts: list, tasks: list[str], max_length: int, skip_layers: int, names):
        return one_pass(self, model, tokenizer, texts, tasks, max_length, skip_layers, names)

    def predict_inputs(self, texts: list, tokenizer, max_length: int) -> tuple[dict, list]:
        """Words of each row (a list, or a text split at whitespace), encoded; per row (words, word ids)."""
        words = [text if isinstance(text, list) else str(text).split() for text in texts]
        encoded = tokenizer(
            words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        return encoded, [(w, encoded.word_ids(row)) for row, w in enumerate(words)]

    def predictions(self, logits: torch.Tensor, contexts: list, label_names: list[str]) -> list[dict]:
        """Per row: its words and one tag per word (read at the word's first sub-word; null if cut off)."""
        tags = logits.argmax(-1).tolist()  # (B, L)
        rows = []
        for row_tags, (words, word_ids) in zip(tags, contexts, strict=True):
            first = align(word_ids, list(range(len(words))))  # the word each scored position starts
            per_word: list[str | None] = [None] * len(words)
            for position, word in enumerate(first):
                if word != IGNORE:
                    per_word[word] = label_names[row_tags[position]]
            rows.append({"words": words, "tags": per_word})
        return rows


def align(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """Per sub-word: the word's tag on its first sub-word, -100 on the others and on special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(tags[word] if word is not None and word != previous else IGNORE)
        previous = word
    return labels


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "") from "O"; a plain tag "PER" reads as ("I", "PER") (IO scheme)."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if prefix in PREFIXES and kind else ("I", tag)


def entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end inclusive, type) of every chunk, by conlleval's startOfChunk / endOfChunk rules."""
    found, start, previous = set(), None, ("O", "")
    for position, tag in enumerate([*tags, "O"]):
        prefix, kind = split_tag(tag)
        before, before_kind = previous
        ends = before in ("E", "S") or (before in ("B", "I") and prefix in ("B", "S", "O"))
        ends |= before != "O" and before_kind != kind
        begins = prefix in ("B", "S") or (before in ("E", "S", "O") and prefix in ("E", "I"))
        begins |= prefix != "O" and before_kind != kind
        if start is not None and ends:
            found.add((start, position - 1, before_kind))
            start = None
        if begins and prefix != "O":
            start = position
        previous = (prefix, kind)
    return found


def entity_f1(predicted: list[list[str]], gold: list[list[str]]) -> float:
    """Micro entity F1 over sentences: 2PR / (P + R), P = correct / predicted, R = correct / gold (0 if none)."""
    correct = guessed = expected = 0
    for pred_tags, gold_tags in zip(predicted, gold, strict=True):
        pred, true = entities(pred_tags), entities(gold_tags)
        correct, guessed, expected = correct + len(pred & true), guessed + len(pred), expected + len(true)
    if correct == 0:
        return 0.0
    precision, recall = correct / guessed, correct / expected
    return 2 * precision * recall / (precision + recall)
