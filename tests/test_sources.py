"""User data through `datasets`, and every bad input the Tasks issue lists."""

import json

import pytest

from adafuse.fusion.errors import UserError
from adafuse.tasks.resolve import resolve_task, sequence_items
from adafuse.tasks.sources import load_user_task
from adafuse.tasks.spec import TaskSpec

ROWS = [("good movie", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("awful acting", "neg")] * 5


def write_csv(path, rows=ROWS, header=("review", "sentiment"), sep=","):
    path.write_text(sep.join(header) + "\n" + "\n".join(sep.join(r) for r in rows) + "\n")
    return path


def test_csv_with_custom_columns_and_carved_splits(tmp_path):
    spec = TaskSpec(
        name="reviews",
        source=str(write_csv(tmp_path / "data.csv")),
        text_column="review",
        label_column="sentiment",
        validation_ratio=0.2,
        test_ratio=0.2,
        split_seed=3,
    )
    task = load_user_task(spec)
    assert task.label_names == ["neg", "pos"]
    assert task.sizes() == {"train": 12, "validation": 4, "test": 4}
    again = load_user_task(spec)
    assert again.splits["test"].texts == task.splits["test"].texts  # seeded


@pytest.mark.parametrize("suffix,sep", [(".tsv", "\t"), (".csv", ",")])
def test_folder_with_split_files(tmp_path, suffix, sep):
    for split in ("train", "dev", "test"):
        write_csv(tmp_path / f"{split}{suffix}", sep=sep)
    task = load_user_task(TaskSpec(name="t", source=str(tmp_path), text_column="review", label_column="sentiment"))
    assert task.sizes() == {"train": 20, "validation": 20, "test": 20}


def test_jsonl_pairs_and_label_names_with_integer_ids(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"a": f"s{i}", "b": f"t{i}", "y": i % 2}) for i in range(20)))
    task = load_user_task(
        TaskSpec(
            name="nli",
            source=str(path),
            text_column="a",
            text_pair_column="b",
            label_column="y",
            label_names=["no", "yes"],
        )
    )
    assert task.label_names == ["no", "yes"] and task.splits["train"].pairs is not None


def bad(tmp_path, **kwargs):
    spec = TaskSpec(name=kwargs.pop("name", "t"), text_column="review", label_column="sentiment", **kwargs)
    return load_user_task(spec)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.csv: file not found"):
        bad(tmp_path, source=str(tmp_path / "nope.csv"))


def test_unknown_extension(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(UserError, match="unknown format '.xlsx'"):
        bad(tmp_path, source=str(tmp_path / "data.xlsx"))


def test_missing_column_lists_found_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", header=("text", "sentiment"))
    with pytest.raises(UserError, match=r"\['review'\] not found; columns found: \['text', 'sentiment'\]"):
        bad(tmp_path, source=str(path))


def test_empty_split(tmp_path):
    write_csv(tmp_path / "train.csv")
    (tmp_path / "test.csv").write_text("review,sentiment\n")
    write_csv(tmp_path / "validation.csv")
    with pytest.raises(UserError, match="test.csv: the file has no rows"):
        bad(tmp_path, source=str(tmp_path))


def test_label_unseen_in_train(tmp_path):
    write_csv(tmp_path / "train.csv")
    write_csv(tmp_path / "validation.csv")
    write_csv(tmp_path / "test.csv", rows=[("meh", "neutral")])
    with pytest.raises(UserError, match="test split, row 0: label 'neutral' not seen in train"):
        bad(tmp_path, source=str(tmp_path))


def test_unknown_task_name_lists_known():
    with pytest.raises(UserError, match="unknown task 'bbc-weather'.*bbc-business"):
        resolve_task("bbc-weather", None, None)


def test_duplicate_task_names():
    with pytest.raises(UserError, match="repeated: bbc-tech"):
        sequence_items(None, ["bbc-tech", "bbc-sports", "bbc-tech"])


@pytest.mark.parametrize(
    "ratios,match",
    [
        ({"validation_ratio": 1.5}, "strictly between 0 and 1"),
        ({"test_ratio": 0.0}, "strictly between 0 and 1"),
        ({"validation_ratio": 0.6, "test_ratio": 0.5}, "must be < 1"),
    ],
)
def test_bad_ratios(tmp_path, ratios, match):
    with pytest.raises(UserError, match=match):
        bad(tmp_path, source=str(write_csv(tmp_path / "d.csv")), **ratios)


def test_single_class_train(tmp_path):
    path = write_csv(tmp_path / "d.csv", rows=[("good", "pos")] * 20)
    with pytest.raises(UserError, match="single class"):
        bad(tmp_path, source=str(path), validation_ratio=0.2, test_ratio=0.2)


def test_non_utf8_is_a_warning_with_count(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(
        ("review,sentiment\n" + "\n".join(f"{t},{y}" for t, y in ROWS) + "\n").encode() + b"caf\xe9 cr\xe8me,pos\n"
    )
    with pytest.warns(UserWarning, match="2 character"):
        task = bad(tmp_path, source=str(path), validation_ratio=0.2, test_ratio=0.2)
    assert sum("\ufffd" in t for s in task.splits.values() for t in s.texts) == 1


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(UserError, match="Hub dataset"):
        load_user_task(TaskSpec(name="t", source="someone/some-dataset"))


def test_integer_labels_sort_as_numbers_and_digit_like_names_as_text(tmp_path):
    rows = [f"text {i},{label}" for i, label in enumerate(["10", "2", "-1", "¹", "b"] * 4)]
    (tmp_path / "data.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    spec = TaskSpec(name="digits", source=str(tmp_path / "data.csv"), validation_ratio=0.2, test_ratio=0.2)
    assert load_user_task(spec).label_names == ["-1", "2", "10", "b", "¹"]  # '¹' is a digit to isdigit, not to int
