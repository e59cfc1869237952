"""Tokenising task splits once, cached on disk and in memory.

The cache key depends on the texts, the tokenizer and ``max_length`` but not on the labels, so the five
bbc-topics tasks (same articles, different labels) share one tokenisation of the corpus.
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
            return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

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
