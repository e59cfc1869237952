"""Tokenising task splits once, cached on disk and in memory.

The cache key depends on the texts, the tokenizer and ``max_length`` but not on the labels, so the five
bbc-topics tasks (same articles, different labels) share one tokenisation of the corpus.

A fast tokenizer encodes a whole text before truncating it, so a 500-word article kept at 32 tokens cost as much
as the whole article. Single texts are cut after their first ``max_length`` words first: every pre-tokenizer here
(BERT's WordPiece, byte-level BPE, SentencePiece) splits at whitespace, so the tokens of a prefix that ends at a
word boundary are the full text's first tokens, and ``max_length`` words make at least ``max_length`` tokens
unless normalisation drops whole words; a row whose cut text came out shorter than ``max_length`` is encoded again
whole. Text pairs are encoded whole (their truncation shares the length between both).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from adafuse.fusion.faults import fault_point
from adafuse.tasks.spec import SplitData

_MEMORY: dict[str, object] = {}


def tokenizer_id(tokenizer) -> str:
    return f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}"


def split_key(split: SplitData, tokenizer, max_length: int) -> str:
    digest = hashlib.sha256(f"{tokenizer_id(tokenizer)}|{max_length}".encode())
    for index, text in enumerate(split.texts):
        digest.update(text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\x00")
        if split.pairs is not None:
            digest.update(split.pairs[index].encode("utf-8", errors="surrogatepass"))
        digest.update(b"\x01")
    return digest.hexdigest()[:24]


def word_prefix(text: str, words: int) -> str:
    """``text`` up to the start of its word number ``words + 1`` (whitespace-separated), or all of it."""
    parts = text.split(maxsplit=words)
    return text if len(parts) <= words else text[: len(text) - len(parts[-1])]


def encode_prefixes(tokenizer, texts: list[str], max_length: int) -> dict:
    """``tokenizer(texts, truncation=True, max_length=max_length)``, encoding only each text's first ``max_length``
    words where that gives the same tokens (see the module's docstring)."""
    cut = [word_prefix(text, max_length) for text in texts]
    encoded = tokenizer(cut, truncation=True, max_length=max_length)
    short = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) < max_length and cut[i] is not texts[i]]
    if short:
        again = tokenizer([texts[i] for i in short], truncation=True, max_length=max_length)
        for key in encoded:
            for i, values in zip(short, again[key], strict=True):
                encoded[key][i] = values
    return encoded


def tokenize_split(split: SplitData, tokenizer, max_length: int, cache_dir: Path | None = None):
    """A ``datasets.Dataset`` with input_ids, attention_mask (token_type_ids) and labels."""
    import datasets
    from datasets import Dataset

    if not sys.stderr.isatty():  # progress bars only on a terminal, not in logs and captured output
        datasets.disable_progress_bars()
    key = split_key(split, tokenizer, max_length)
    if key not in _MEMORY:
        columns = {"text": split.texts} | ({"text_pair": split.pairs} if split.pairs is not None else {})

        def encode(batch):
            fault_point("tokenize")
            pair = batch.get("text_pair")
            if pair is not None:
                return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
            return encode_prefixes(tokenizer, batch["text"], max_length)

        cache_file = str(Path(cache_dir) / f"tokens-{key}.arrow") if cache_dir is not None else None
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        dataset = Dataset.from_dict(columns).map(
            encode,
            batched=True,
            remove_columns=list(columns),
            cache_file_name=cache_file,
            load_from_cache_file=True,
            new_fingerprint=key,
            desc="tokenizing",
        )
        _MEMORY[key] = dataset
    return _MEMORY[key].add_column(
        "labels", list(split.labels), new_fingerprint=f"{key}-labels-{hash(tuple(split.labels))}"
    )
