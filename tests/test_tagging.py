"""Tagging (token classification): sub-word alignment, CoNLL entity F1, user data checks, and a mixed
classification -> tagging sequence, a tagging fusion and predict through the CLI on tiny backbones."""

import json
import random

import pytest
import torch
from conftest import ROOT

from adafuse.continual.cli import main
from adafuse.fusion.heads import build_head
from adafuse.tasks.synthetic import PEOPLE as SYNTHETIC_PEOPLE
from adafuse.tasks.synthetic import PLACES as SYNTHETIC_PLACES
from adafuse.tasks.synthetic import people_places
from adafuse.tasks.types.tagging import Tagging, align, entities, entity_f1

PEOPLE, PLACES = SYNTHETIC_PEOPLE[:8], SYNTHETIC_PLACES[:8]


def tagged_rows(count: int, split: str) -> list[dict]:
    """The first ``count`` sentences of a split of the built-in synthetic tagging task (BIO, PER and LOC)."""
    task = people_places()
    data = task.splits[split]
    return [Tagging().example(w, t, task.label_names) for w, t in zip(data.texts[:count], data.labels, strict=False)]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tagging_folder(folder, count: int = 48):
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", count), ("validation", 16), ("test", 16)):
        write_jsonl(folder / f"{split}.jsonl", tagged_rows(size, split))
    return folder


# ---- pure functions ---------------------------------------------------------------------------------------------
def test_align_labels_the_first_sub_word_of_each_word():
    assert align([None, 0, 0, 1, 2, 2, 2, None], [5, 6, 7]) == [-100, 5, -100, 6, 7, -100, -100, -100]


def test_entities_follow_the_conll_chunk_rules():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 1, "PER"), (3, 3, "LOC")}
    assert entities(["I-PER", "I-PER", "I-LOC"]) == {(0, 1, "PER"), (2, 2, "LOC")}  # IOB1: I after O starts
    assert entities(["B-PER", "B-PER"]) == {(0, 0, "PER"), (1, 1, "PER")}
    assert entities(["PER", "PER", "O", "LOC"]) == {(0, 1, "PER"), (3, 3, "LOC")}  # plain tags: IO scheme
    assert entities(["S-PER", "B-LOC", "E-LOC", "E-LOC"]) == {(0, 0, "PER"), (1, 2, "LOC"), (3, 3, "LOC")}


def test_entity_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-PER"]]
    # gold 3 entities; predicted 4 (PER 0-0 wrong span, LOC right, LOC right, PER wrong): P 2/4, R 2/3
    assert entity_f1(predicted, gold) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert entity_f1(gold, gold) == 1.0 and entity_f1([["O", "O"]], [["O", "B-PER"]]) == 0.0


def test_tagging_head_gives_logits_per_position():
    head = build_head(8, "tagging", num_labels=5, dropout=0.0)
    assert head(torch.randn(2, 7, 8), None).shape == (2, 7, 5)


# ---- through the CLI -----------------------------------------------------------------------------------------------
def shared_yaml(backbone: str) -> str:
    """Seed, backbone, adapter and trainer settings shared by the runs and fusions here."""
    backbone_yaml = (ROOT / "configs" / "backbone" / f"tiny-{backbone}.yaml").read_text()
    return (
        "seed: 0\nmax_length: 32\nbackbone:\n"
        + "".join(f"  {line}\n" for line in backbone_yaml.splitlines() if not line.startswith("#"))
        + "adapter: {placement: pfeiffer, reduction_factor: 4}\n"
        "trainer: {max_epochs: 2, batch_size: 8, eval_batch_size: 32, lr: 0.003, progress_bar: false}\n"
    )


def mixed_config(tmp_path, backbone: str = "bert") -> str:
    """A classification task (CSV), then a tagging task (JSONL folder), on a tiny random backbone."""
    rows = [("the market rallied on profits", "money"), ("the striker scored a goal", "sport")] * 24
    (tmp_path / "news.csv").write_text("headline,topic\n" + "\n".join(f"{t} {i},{y}" for i, (t, y) in enumerate(rows)))
    tagging_folder(tmp_path / "names")
    config = tmp_path / f"mixed-{backbone}.yaml"
    config.write_text(
        "tasks:\n"
        "  - {name: news, source: news.csv, text_column: headline, label_column: topic, max_length: 16}\n"
        "  - {name: names, type: tagging, source: names, max_length: 24}\n"
        "method: adapters\n" + shared_yaml(backbone)
    )
    return str(config)


def fuse_config(tmp_path, backbone: str, target: str) -> str:
    config = tmp_path / f"fuse-{backbone}.yaml"
    config.write_text(f"target: {target}\nsources: all\n" + shared_yaml(backbone))
    return str(config)


pytestmark = pytest.mark.xdist_group("tagging")  # one worker: the module-scoped runs are made once


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mixed")
    out = tmp_path / "out"
    assert main(["run", mixed_config(tmp_path), "--out", str(out)]) == 0
    return tmp_path, out, json.loads((out / "metrics.json").read_text())


def test_mixed_sequence_measures_each_task_with_its_own_metric(mixed_run):
    _, out, metrics = mixed_run
    assert [metrics["per_task"][t]["metric"] for t in ("news", "names")] == ["accuracy", "entity_f1"]
    matrix, f1 = metrics["accuracy_matrix"], metrics["entity_f1_matrix"]
    assert matrix[1][1] == f1[1][1] and f1[1][0] is None  # the tagging task's cell is its entity F1
    assert matrix[1][0] == matrix[0][0] and metrics["bwt"] == 0.0  # the classifier is untouched by task 2
    assert 0.0 <= metrics["token_accuracy_matrix"][1][1] <= 1.0
    report = (out / "report.md").read_text()
    assert "accuracy / entity_f1" in report and "| names | entity_f1 |" in report


@pytest.mark.parametrize("backbone", ["gpt2"])
def test_tagging_trains_on_a_decoder(backbone, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                mixed_config(tmp_path, backbone),
                "--out",
                str(out),
                "--tasks",
                "[{name: names, type: tagging, source: names}]",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["per_task"]["names"]["metric"] == "entity_f1"


def test_fusion_for_a_tagging_target(mixed_run):
    tmp_path, out, _ = mixed_run
    config = fuse_config(tmp_path, "bert", "{name: names-fused, type: tagging, source: names, max_length: 24}")
    fused = tmp_path / "fused"
    assert main(["fuse", config, "--library", str(out / "library"), "--out", str(fused)]) == 0
    metrics = json.loads((fused / "metrics.json").read_text())
    assert metrics["metric"] == "entity_f1" and list(metrics["test"]) == ["entity_f1", "token_accuracy"]
    assert metrics["source_files_unchanged"]
    assert "entity_f1" in (fused / "report.md").read_text()


BAD_ROWS = [
    ({"tokens": ["Anna", "flew"], "tags": ["B-PER"]}, "2 words in 'tokens' but 1 tags in 'tags'"),
    ({"tokens": [], "tags": []}, "'tokens' is empty"),
    ({"tokens": ["Anna", "flew"], "tags": ["B-PER", "B-ORG"]}, "label 'B-ORG' not seen in train"),
    ({"tokens": "Anna flew", "tags": ["B-PER", "O"]}, "must be lists"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_tagging_rows_are_refused_in_one_line(row, message, tmp_path, capsys):
    folder = tagging_folder(tmp_path / "names", count=8)
    write_jsonl(folder / "test.jsonl", [*tagged_rows(3, "test"), row])
    smoke = [
        str(ROOT / "configs" / "sequence" / "smoke.yaml"),
        "--tasks",
        f"[{{name: names, type: tagging, source: {folder}}}]",
    ]
    assert main(["run", *smoke, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "test split, row 3" in err
    assert not (tmp_path / "out").exists()


def test_predict_routes_mixed_type_rows_in_one_file(mixed_run, tmp_path):
    _, out, _ = mixed_run
    rows = [
        {"text": "the striker scored a goal", "task": "news"},
        {"text": "Anna flew to Paris on monday", "task": "names"},
        {"text": ["yesterday", "Chen", "met", "Boris"], "task": "names"},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["predict", "--library", str(out / "library"), "--input", str(tmp_path / "in.jsonl")]
    assert main([*args, "--task-column", "task", "--out", str(tmp_path / "out.jsonl")]) == 0
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert results[0]["task"] == "news" and results[0]["label_name"] in ("money", "sport")
    assert results[1]["words"] == rows[1]["text"].split() and len(results[1]["tags"]) == 6
    assert results[2]["words"] == rows[2]["text"] and set(results[2]["tags"]) <= {"O", "B-PER", "I-PER", "B-LOC"}


# ---- generation ----------------------------------------------------------------------------------------------------
def generation_folder(folder, count: int = 40):
    """Prompt -> target pairs: a place's partner word (a memorised mapping, exact match measurable)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = dict(zip(PLACES, PEOPLE, strict=True))
    rng = random.Random(0)
    for split, size in (("train", count), ("validation", 8), ("test", 8)):
        rows = [{"prompt": f"who lives in {p} ?", "target": pairs[p].lower()} for p in rng.choices(PLACES, k=size)]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


@pytest.mark.parametrize("backbone", ["gpt2", "t5"])
def test_mixed_sequence_classifies_tags_and_generates(backbone, tmp_path):
    config = mixed_config(tmp_path, backbone)
    generation_folder(tmp_path / "pairs")
    tasks = (
        "[{name: news, source: news.csv, text_column: headline, label_column: topic, max_length: 16}, "
        "{name: names, type: tagging, source: names}, {name: pairs, type: generation, source: pairs}]"
    )
    out = tmp_path / "out"
    assert main(["run", config, "--tasks", tasks, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [metrics["per_task"][t]["metric"] for t in metrics["tasks"]] == ["accuracy", "entity_f1", "exact_match"]
    matrix = metrics["accuracy_matrix"]
    assert matrix[2][0] == matrix[0][0] and matrix[2][1] == matrix[1][1] and metrics["bwt"] == 0.0
    assert metrics["forgetting"] == 0.0  # the untrained cells before each task are no knowledge to forget
    assert metrics["exact_match_matrix"][2][2] == matrix[2][2] and metrics["loss_per_token_matrix"][2][2] > 0
    write_jsonl(
        tmp_path / "in.jsonl", [{"text": "who lives in Oslo ?", "task": "pairs"}, {"text": "a goal", "task": "news"}]
    )
    args = [
        "predict",
        "--library",
        str(out / "library"),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--task-column",
        "task",
    ]
    assert main([*args, "--out", str(tmp_path / "p.jsonl")]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert isinstance(first["generated"], str) and second["label_name"] in ("money", "sport")
    fuse = fuse_config(tmp_path, backbone, "{name: pairs-fused, type: generation, source: pairs}")
    fused = tmp_path / "fused"  # fusion for a generation target over the three type-mixed adapters
    assert main(["fuse", fuse, "--library", str(out / "library"), "--out", str(fused)]) == 0
    result = json.loads((fused / "metrics.json").read_text())
    assert result["metric"] == "exact_match" and sorted(result["sources"]) == ["names", "news", "pairs"]
    assert result["source_files_unchanged"] and 0.0 <= result["test"]["exact_match"] <= 1.0


def test_generation_is_refused_on_an_encoder(tmp_path, capsys):
    generation_folder(tmp_path / "pairs")
    smoke = [
        str(ROOT / "configs" / "sequence" / "smoke.yaml"),
        "--tasks",
        f"[{{name: pairs, type: generation, source: {tmp_path / 'pairs'}}}]",
    ]
    assert main(["run", *smoke, "--out", str(tmp_path / "out")]) == 2
    assert "generation needs a decoder or encoder-decoder backbone" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_empty_target_is_refused(tmp_path, capsys):
    folder = generation_folder(tmp_path / "pairs")
    write_jsonl(folder / "test.jsonl", [{"prompt": "who lives in Oslo ?", "target": " "}])
    config = mixed_config(tmp_path, "gpt2")
    assert (
        main(
            [
                "run",
                config,
                "--tasks",
                f"[{{name: pairs, type: generation, source: {folder}}}]",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "test split, row 0: column 'target' must be a non-empty text, found empty" in err and "\n" not in err


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5"])
def test_batched_greedy_decoding_equals_one_prompt_at_a_time(model_type):
    from conftest import tiny_backbone

    from adafuse.fusion.model import AdaptedModel
    from adafuse.tasks.types.generation import decode

    model = AdaptedModel(tiny_backbone(model_type)).eval()
    model.add_head("lm", head_type=model.sites.lm, **model.head_options(model.sites.lm))
    model.activate(head="lm")
    prompts = [[5, 9, 13, 2], [7], [3, 3, 8]]
    batched = decode(model, prompts, 6, end=-1)  # no end token: every row runs the full budget
    assert batched == [decode(model, [p], 6, end=-1)[0] for p in prompts]
    assert all(len(row) == 6 for row in batched)


def test_the_mixed_types_config_runs_the_built_in_sequence(tmp_path):
    tiny = [
        "--backbone.random_init.n_embd",
        "32",
        "--backbone.random_init.n_layer",
        "2",
        "--backbone.random_init.n_head",
        "2",
    ]
    short = ["--backbone.random_init.n_inner", "64", "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1"]
    out = tmp_path / "out"
    config = str(ROOT / "configs" / "sequence" / "mixed-types.yaml")
    assert main(["run", config, *tiny, *short, "--max_length", "48", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["bbc-sports", "synthetic-people-places", "synthetic-who-lives-where"]
    assert [metrics["per_task"][t]["metric"] for t in metrics["tasks"]] == ["accuracy", "entity_f1", "exact_match"]
    assert metrics["bwt"] == 0.0


def test_synthetic_built_ins_export_as_files_their_types_read(tmp_path):
    assert main(["tasks", "export", "mixed-types", "--out", str(tmp_path)]) == 0
    tagging = json.loads((tmp_path / "synthetic-people-places" / "train.jsonl").read_text().splitlines()[0])
    generation = json.loads((tmp_path / "synthetic-who-lives-where" / "test.jsonl").read_text().splitlines()[0])
    assert len(tagging["tokens"]) == len(tagging["tags"]) and set(generation) == {"prompt", "target"}
