"""The class-incremental setting: disjoint BBC category groups, task identification by streaming LDA, and
evaluation without the task (the oracle numbers equal the task-incremental run's)."""

import json

import pytest
import torch
from conftest import ROOT, randomize, tiny_backbone

from adafuse.continual.cli import main
from adafuse.continual.config import HeadConfig, RouterConfig, TrainerConfig
from adafuse.continual.routing.lda import identify, pooled, task_statistics
from adafuse.continual.routing.trained import ROUTER, TrainedRouter, kept_examples, train_router
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import AdapterLibrary
from adafuse.fusion.model import AdaptedModel
from adafuse.tasks.bbc import CATEGORIES
from adafuse.tasks.builtin import CLASS_GROUPS, SEQUENCES, load_builtin

SMOKE = [str(ROOT / "configs" / "sequence" / "smoke.yaml"), "--trainer.limit_train_batches", "3"]
CLASS_INCREMENTAL = ["--tasks", "null", "--sequence", "bbc-class-incremental", "--trainer.max_epochs", "1"]


def test_identify_picks_the_task_of_the_best_discriminant_class():
    features = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2]])
    first = task_statistics(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([0, 0]), 1)  # task 0: one class
    second = task_statistics(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.tensor([0, 1]), 2)  # task 1: two
    assert identify(features, [first, second]).tolist() == [0, 1, 1]


def test_the_shared_covariance_separates_what_the_nearest_mean_confuses():
    # every class spreads along x: a point near task 1's mean in x but low in y is task 0's
    spread = torch.tensor([[-4.0, 0.0], [4.0, 0.0]])
    first = task_statistics(spread, torch.tensor([0, 0]), 1)  # mean (0, 0)
    second = task_statistics(spread + torch.tensor([2.0, 1.0]), torch.tensor([0, 0]), 1)  # mean (2, 1)
    point = torch.tensor([[2.0, 0.2]])
    nearest = (point - torch.cat([first["means"], second["means"]]).float()).norm(dim=-1).argmin()
    assert nearest.item() == 1 and identify(point, [first, second]).tolist() == [0]
    assert identify(torch.tensor([[2.0, 0.8]]), [first, second]).tolist() == [1]


def test_task_statistics_stream_to_the_joint_fit():
    torch.manual_seed(0)
    features, labels = torch.randn(40, 3), torch.randint(0, 4, (40,))
    joint = task_statistics(features, labels, 4)
    parts = [task_statistics(features[labels < 2], labels[labels < 2], 2)]
    parts.append(task_statistics(features[labels >= 2], labels[labels >= 2] - 2, 2))
    torch.testing.assert_close(sum(p["scatter"] for p in parts), joint["scatter"])
    torch.testing.assert_close(torch.cat([p["means"] for p in parts]), joint["means"])
    assert sum(int(p["count"]) for p in parts) == 40


def test_pooled_features_ignore_padding_and_are_unit_length():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    out = pooled(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]) / 0.5**0.5)


def test_the_class_groups_cover_each_category_once():
    assert sorted(c for group in CLASS_GROUPS for c in group) == sorted(CATEGORIES)
    topic5 = load_builtin("bbc-topic5")
    tasks = [load_builtin(name) for name in SEQUENCES["bbc-class-incremental"]]
    for split in ("train", "validation", "test"):
        assert sum(len(t.splits[split].texts) for t in tasks) == len(topic5.splits[split].texts)
    assert [t.label_names for t in tasks] == [list(g) for g in CLASS_GROUPS]


@pytest.mark.parametrize("method", ["adapters", "shared-adapter"])
def test_class_incremental_oracle_equals_the_task_incremental_run(method, tmp_path):
    runs = {}
    for setting in ("task-incremental", "class-incremental"):
        out = tmp_path / setting
        args = [*SMOKE, *CLASS_INCREMENTAL, "--method", method, "--setting", setting, "--out", str(out)]
        assert main(["run", *args]) == 0
        runs[setting] = json.loads((out / "metrics.json").read_text())
    given, hidden = runs["task-incremental"], runs["class-incremental"]
    assert hidden["oracle_accuracy_matrix"] == given["accuracy_matrix"]  # the same models, given the task
    assert "oracle_accuracy_matrix" not in given
    assert ("task_id_accuracy_matrix" in hidden) == (method == "adapters")  # only isolated adapters route
    if method == "adapters":
        assert hidden["task_id_accuracy_matrix"][0][0] == 1.0  # one task seen: nothing to confuse
        assert 0 <= hidden["final_task_id_accuracy"] <= 1


def test_class_incremental_refuses_a_label_in_two_tasks(tmp_path, capsys):
    args = [*SMOKE, "--tasks", "[bbc-topic5, bbc-topic5-fewshot]", "--setting", "class-incremental"]
    assert main(["run", *args, "--out", str(tmp_path / "x")]) == 2
    assert "label 'business' belongs to tasks 'bbc-topic5' and 'bbc-topic5-fewshot'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("router", ["lda", "trained"])
def test_predict_task_auto_routes_like_the_class_incremental_evaluation(router, tmp_path):
    out = tmp_path / "run"
    args = [*SMOKE, *CLASS_INCREMENTAL, "--setting", "class-incremental", "--router.kind", router, "--out", str(out)]
    assert main(["run", *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tasks = [load_builtin(name, max_length=32) for name in SEQUENCES["bbc-class-incremental"]]
    tests = [t.splits["test"] for t in tasks]
    rows = [
        (text, t.label_names[y])
        for t, s in zip(tasks, tests, strict=True)
        for text, y in zip(s.texts, s.labels, strict=True)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text, _ in rows))
    predict = ["predict", "--library", str(out / "library"), "--task", "auto", "--max-length", "32"]
    assert main([*predict, "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")]) == 0
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {r["task"] for r in results} <= set(SEQUENCES["bbc-class-incremental"])
    correct = sum(r["label_name"] == truth for r, (_, truth) in zip(results, rows, strict=True))
    sizes = [len(t.splits["test"].texts) for t in tasks]
    expected = sum(a * n for a, n in zip(metrics["accuracy_matrix"][-1], sizes, strict=True))
    assert abs(correct - expected) <= 2  # the same routing and heads (batch padding may move a rounding)
    entry = AdapterLibrary(out / "library").get("router", SEQUENCES["bbc-class-incremental"][-1])
    assert entry["config"].get("router", {}).get("kind", "lda") == router
    if router == "trained":  # its classes' owners, and every kept training example of both tasks
        assert entry["config"]["router"]["owners"] == [0, 0, 1, 1, 1]
        assert entry["config"]["router"]["examples"] == sum(len(t.splits["train"].texts) for t in tasks)
        assert entry["config"]["router"]["epochs"] == metrics["router_training"]["epochs"] == 1
    else:
        assert "router_training" not in metrics


def test_predict_task_auto_needs_routers(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "shares rose"}) + "\n")
    plain = tmp_path / "plain"
    assert (
        main(["run", *SMOKE, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--out", str(plain)])
        == 0
    )
    no_router = [
        "predict",
        "--library",
        str(plain / "library"),
        "--task",
        "auto",
        "--input",
        str(tmp_path / "in.jsonl"),
    ]
    assert main([*no_router, "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "has no routers (a run with setting: class-incremental" in capsys.readouterr().err
    assert not (tmp_path / "y.jsonl").exists()


@pytest.mark.parametrize(
    "options",
    [["--method", "shared-adapter", "--setting", "class-incremental"], ["--setting", "task-incremental"]],
)
def test_a_trained_router_is_for_class_incremental_isolated_adapters(options, tmp_path, capsys):
    args = [*SMOKE, *CLASS_INCREMENTAL, *options, "--router.kind", "trained", "--out", str(tmp_path / "x")]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "router.kind: 'trained' routes isolated adapters" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_kept_examples_move_labels_to_their_task_offsets():
    first = [{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": 1, "extra": 0}]
    second = [
        {"input_ids": [7], "attention_mask": [1], "labels": 0},
        {"input_ids": [8], "attention_mask": [1], "labels": 2},
    ]
    kept = kept_examples([first, second], [0, 2])
    assert [e["labels"] for e in kept] == [1, 2, 4] and "extra" not in kept[0]


def test_the_trained_router_learns_the_tasks_and_touches_nothing_else():
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("task", AdapterConfig(reduction_factor=4))
    randomize(model.backbone, seed=1, std=0.05)
    before = {k: v.clone() for k, v in model.adapter_state("task").items()}
    generator = torch.Generator().manual_seed(0)
    examples = []  # class c (owned by task c // 2) writes tokens from its own vocabulary range
    for c in range(4):
        for _ in range(24):
            ids = torch.randint(10 + 20 * c, 30 + 20 * c, (6,), generator=generator).tolist()
            examples.append({"input_ids": ids, "attention_mask": [1] * 6, "labels": c})
    trainer = TrainerConfig(batch_size=8, lr=1e-6)  # too small to learn in 10 epochs: the router's own lr is used
    rng = torch.get_rng_state()
    adapter, head = AdapterConfig(reduction_factor=4), HeadConfig(pooling="mean")
    tensors = train_router(model, examples, collate, 4, adapter, head, trainer, RouterConfig("trained", 10, 1e-2), 0)
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is left as it was
    assert all(torch.equal(v, before[k]) for k, v in model.adapter_state("task").items())  # bit-identical
    assert ROUTER not in model.adapter_configs and ROUTER not in model.heads
    assert not any(p.requires_grad for p in model.parameters())
    assert {k.split(".")[1] for k in tensors} == {"adapter", "head"}
    router = TrainedRouter(model, tensors, [0, 0, 1, 1], adapter, head)
    batch = collate(examples)
    truth = batch.pop("labels") // 2
    assert (router(batch) == truth).float().mean() > 0.9
    router.close()
    assert ROUTER not in model.adapter_configs


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}
