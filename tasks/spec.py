"""Task specs (what a user writes in YAML) and task data (what the trainer consumes)."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


@dataclass
class TaskSpec:
    """A task from user data, or a built-in task when only ``name`` is given.

    Attributes:
        name: unique task name (also the adapter's and head's name in the library).
        type: the task type (:data:`adafuse.tasks.types.TASK_TYPES`): ``classification``, ``tagging``,
            ``generation`` or ``image``.
        source: a CSV/TSV/JSON/JSONL/parquet file or folder, or a Hub dataset name (online).
        text_column: column holding the text.
        text_pair_column: second text column for sentence-pair tasks.
        label_column: column holding the label (names or integer ids).
        tokens_column, tags_column: tagging: the list of words and the list of their tags (names or ids).
        prompt_column, target_column: generation: the prompt and the text to generate after it.
        image_column: image: the image (a path relative to the data file's folder, or bytes).
        splits: split name -> file (relative to ``source`` when it is a folder) or Hub split name.
        validation_ratio, test_ratio: carve missing splits out of train with ``split_seed``.
        split_seed: seed of the random split that ``validation_ratio`` and ``test_ratio`` carve.
        max_length: tokenizer truncation length.
        label_names: label names in id order (default: sorted labels seen in train).
        shots: for built-in few-shot tasks, train examples per class.
    """

    name: str
    type: str = "classification"
    source: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    prompt_column: str = "prompt"
    target_column: str = "target"
    image_column: str = "image"
    splits: dict[str, str] | None = None
    validation_ratio: float | None = None
    test_ratio: float | None = None
    split_seed: int = 0
    max_length: int = 128
    label_names: list[str] | None = None
    shots: int | None = None


@dataclass
class SplitData:
    """One split's examples. Tagging: each text is a list of words and each label a list of tag ids."""

    texts: list
    labels: list
    pairs: list[str] | None = None
    ids: list[str] | None = None  # stable example ids (file names for built-ins)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    splits: dict[str, SplitData] = field(default_factory=dict)
    max_length: int = 128
    type: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        return {split: len(self.splits[split]) for split in SPLITS}
