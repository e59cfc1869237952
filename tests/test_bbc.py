from collections import Counter

from adafuse.tasks.bbc import CATEGORIES, load_articles, split_of
from adafuse.tasks.builtin import SEQUENCES, load_builtin

EXPECTED = {
    "business": (357, 51, 102),
    "entertainment": (269, 39, 78),
    "politics": (291, 42, 84),
    "sports": (357, 51, 103),
    "tech": (280, 40, 81),
}


def test_split_rule():
    assert [split_of(i) for i in range(11)] == [
        "test",
        "validation",
        "train",
        "train",
        "train",
        "test",
        "train",
        "train",
        "train",
        "train",
        "test",
    ]


def test_split_sizes_match_the_protocol():
    articles = load_articles()
    assert len(articles) == 2225
    counts = Counter((a.category, a.split) for a in articles)
    for category, (train, validation, test) in EXPECTED.items():
        assert (counts[category, "train"], counts[category, "validation"], counts[category, "test"]) == (
            train,
            validation,
            test,
        )
    assert Counter(a.split for a in articles) == {"train": 1554, "validation": 223, "test": 448}


def test_no_article_crosses_splits_and_text_is_normalised():
    articles = load_articles()
    splits_of_file = {}
    for a in articles:
        splits_of_file.setdefault(a.file_id, set()).add(a.split)
    assert len(splits_of_file) == 2225 and all(len(s) == 1 for s in splits_of_file.values())
    assert all("\n" not in a.text and "  " not in a.text and a.text == a.text.strip() for a in articles)
    assert sum("\ufffd" in a.text for a in articles) == 1  # the one file that is not valid UTF-8, kept as is


def test_binary_sequence_tasks():
    assert SEQUENCES["bbc-topics"] == [f"bbc-{c}" for c in CATEGORIES]
    task = load_builtin("bbc-politics")
    assert task.label_names == ["not-politics", "politics"]
    assert task.sizes() == {"train": 1554, "validation": 223, "test": 448}
    assert sum(task.splits["test"].labels) == 84


def test_fewshot_takes_the_first_train_articles_per_category():
    task = load_builtin("bbc-topic5-fewshot")
    assert task.sizes() == {"train": 80, "validation": 223, "test": 448}
    assert Counter(task.splits["train"].labels) == {i: 16 for i in range(5)}
    assert task.splits["train"].ids[:3] == ["business/003.txt", "business/004.txt", "business/005.txt"]
    assert load_builtin("bbc-topic5-fewshot", shots=4).sizes()["train"] == 20
