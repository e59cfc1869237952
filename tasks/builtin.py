"""Built-in tasks and sequences on the BBC News protocol (see :mod:`adafuse.tasks.bbc`)."""

from __future__ import annotations

from adafuse.fusion.errors import UserError
from adafuse.tasks.bbc import CATEGORIES, SPLITS, fewshot_train, load_articles
from adafuse.tasks.digits import digits
from adafuse.tasks.spec import SplitData, TaskData
from adafuse.tasks.synthetic import SYNTHETIC

TYPED = {**SYNTHETIC, "digits": digits}  # built-ins beyond BBC classification: tagging, generation, images

# class-incremental: the categories arrive in disjoint groups, each task a classifier over its group's articles
# alone; two groups (2 + 3), since five categories cannot make three groups of at least two (a group of one
# would give an isolated adapter a one-class head)
CLASS_GROUPS = (("business", "entertainment"), ("politics", "sports", "tech"))
SEQUENCES = {
    "bbc-topics": [f"bbc-{c}" for c in CATEGORIES],
    "bbc-class-incremental": ["bbc-classes-" + "-".join(group) for group in CLASS_GROUPS],
    # one decoder, three task types: classification (BBC), tagging and generation (synthetic, see .synthetic)
    "mixed-types": ["bbc-sports", "synthetic-people-places", "synthetic-who-lives-where"],
}
TOPIC_TASKS = ("bbc-topic5", "bbc-topic5-fewshot")
DEFAULT_SHOTS = 16


def task_names() -> list[str]:
    return [*SEQUENCES["bbc-topics"], *TOPIC_TASKS, *SEQUENCES["bbc-class-incremental"], *TYPED]


def is_builtin(name: str) -> bool:
    return name in task_names()


def unknown_task(name: str) -> UserError:
    return UserError(
        f"unknown task '{name}'; built-in tasks: {', '.join(task_names())}; sequences: {', '.join(SEQUENCES)} "
        "(or give a task spec with a 'source')"
    )


def load_builtin(name: str, shots: int | None = None, max_length: int = 128) -> TaskData:
    """One built-in task as TaskData (text + integer labels per split)."""
    if not is_builtin(name):
        raise unknown_task(name)
    if name in TYPED:
        return TYPED[name](max_length)
    articles = load_articles()
    if name in TOPIC_TASKS:
        label_names = list(CATEGORIES)
        by_split = {split: [a for a in articles if a.split == split] for split in SPLITS}
        if name == "bbc-topic5-fewshot":
            count = DEFAULT_SHOTS if shots is None else shots
            if count < 1:
                raise UserError(f"task '{name}': shots must be >= 1, got {count}")
            by_split["train"] = fewshot_train(articles, count)
        label_of = CATEGORIES.index
    elif name in SEQUENCES["bbc-class-incremental"]:
        label_names = list(CLASS_GROUPS[SEQUENCES["bbc-class-incremental"].index(name)])
        by_split = {split: [a for a in articles if a.split == split and a.category in label_names] for split in SPLITS}
        label_of = label_names.index
    else:
        category = name.removeprefix("bbc-")
        label_names = [f"not-{category}", category]
        by_split = {split: [a for a in articles if a.split == split] for split in SPLITS}

        def label_of(article_category: str) -> int:
            return int(article_category == category)

    splits = {
        split: SplitData(
            texts=[a.text for a in items], labels=[label_of(a.category) for a in items], ids=[a.file_id for a in items]
        )
        for split, items in by_split.items()
    }
    return TaskData(name=name, label_names=label_names, splits=splits, max_length=max_length)
