"""The sequence runner end to end on the tiny smoke config: isolation measured, determinism, resume, baselines."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from cli_process import CliProcess, run_cli
from conftest import forgetting_sequence, stable

from adafuse.continual.cli import main
from adafuse.continual.reporting.schema import RUN_FIELDS, undocumented
from adafuse.fusion.library import AdapterLibrary

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "sequence" / "smoke.yaml")


pytestmark = pytest.mark.xdist_group("runner")  # one worker: the module-scoped runs are made once


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", SMOKE, "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_outputs_and_measured_isolation(smoke_run):
    out, metrics = smoke_run
    assert undocumented(RUN_FIELDS, metrics) == []
    library = AdapterLibrary(out / "library")
    for j, task in enumerate(metrics["tasks"]):  # the monitor's R[j][j] kept with the adapter and its head
        record = library.get("adapter", task)["metrics"]["test"]
        assert record["accuracy"] == metrics["accuracy_matrix"][j][j]
        assert record["head_sha256"] == library.get("head", task)["sha256"]
    for name in ("config.yaml", "report.md", "accuracy_matrix.png", "library/manifest.json"):
        assert (out / name).is_file(), name
    assert metrics["tasks"] == ["bbc-business", "bbc-sports", "bbc-tech"]
    r = metrics["accuracy_matrix"]
    assert r[0][2] is None and all(v is not None for v in r[2])
    # measured, not assumed: every earlier task re-evaluated from the library after each later task
    assert r[0][0] == r[1][0] == r[2][0] and r[1][1] == r[2][1]
    assert metrics["bwt"] == 0.0 and metrics["forgetting"] == 0.0
    assert set(metrics) >= {
        "method",
        "tasks",
        "accuracy_matrix",
        "acc",
        "bwt",
        "fwt",
        "forgetting",
        "intransigence",
        "per_task",
    }
    assert AdapterLibrary(out / "library").verify() == []
    assert all(metrics["per_task"][t]["trainable_params"] > 0 for t in metrics["tasks"])


def test_two_runs_are_identical(smoke_run, tmp_path):
    _, metrics = smoke_run
    assert main(["run", SMOKE, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert stable(again) == stable(metrics)


def test_rerun_reuses_the_library(smoke_run, tmp_path):
    out, metrics = smoke_run
    assert main(["run", SMOKE, "--out", str(tmp_path / "reuse"), "--library", str(out / "library")]) == 0
    reused = json.loads((tmp_path / "reuse" / "metrics.json").read_text())
    assert all(t["reused"] for t in reused["per_task"].values())
    assert reused["accuracy_matrix"] == metrics["accuracy_matrix"]


@pytest.mark.slow
def test_killed_during_task_2_resumes_to_the_same_metrics(smoke_run, tmp_path):
    _, metrics = smoke_run
    out = tmp_path / "killed"
    proc = CliProcess(["run", SMOKE, "--out", str(out)])
    proc.wait_for_line("[2/3] bbc-sports: training")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait().returncode == -signal.SIGKILL
    first = (out / "library" / "adapters" / "bbc-business.safetensors").read_bytes()
    assert not (out / "metrics.json").exists()
    assert main(["run", SMOKE, "--out", str(out)]) == 0
    assert (out / "library" / "adapters" / "bbc-business.safetensors").read_bytes() == first
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["per_task"]["bbc-business"]["reused"]
    assert stable(resumed)["accuracy_matrix"] == stable(metrics)["accuracy_matrix"]
    assert resumed["acc"] == metrics["acc"] and resumed["bwt"] == metrics["bwt"]


def test_second_run_on_the_same_out_is_refused(tmp_path):
    from adafuse.fusion.storage import FileLock

    out = tmp_path / "busy"
    out.mkdir()
    with FileLock(out / ".run.lock"):
        result = run_cli("run", SMOKE, "--out", str(out))
    assert result.returncode == 2 and f"pid {os.getpid()}" in result.stderr


@pytest.mark.parametrize(
    "method,extra",
    [
        ("shared-adapter", ["--adapter.reduction_factor", "1", "--trainer.lr", "0.03", "--trainer.max_epochs", "5",
                            "--head.pooling", "mean"]),
        ("full-finetune", []),
    ],
)  # fmt: skip
def test_baselines_forget(method, extra, tmp_path):
    out = tmp_path / method
    args = ["run", str(forgetting_sequence(tmp_path)), "--out", str(out), "--method", method, *extra]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["accuracy_matrix"][0][0] > 0.95  # it learns A, then forgets it
    assert metrics["bwt"] < -0.2 and metrics["forgetting"] > 0.2


def test_report_side_by_side(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    assert main(["report", str(out), str(out), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("| adapters (bottleneck) |") == 2 and (tmp_path / "comparison.png").is_file()


def test_reference_models_give_intransigence(tmp_path):
    out = tmp_path / "ref"
    assert main(["run", SMOKE, "--out", str(out), "--monitor.reference", "true", "--trainer.max_epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["reference_accuracy"]) == 3
    # a reference adapter trained alone from the same seeded init and data order is the same computation:
    diagonal = [metrics["accuracy_matrix"][j][j] for j in range(3)]
    assert metrics["reference_accuracy"] == diagonal and metrics["intransigence"] == 0.0


def test_user_csv_trains_through_the_same_path(tmp_path):
    rows = [("the market rallied on profits", "money"), ("the striker scored a goal", "sport")] * 30
    (tmp_path / "news.csv").write_text("headline,topic\n" + "\n".join(f"{t} {i},{y}" for i, (t, y) in enumerate(rows)))
    smoke = (ROOT / "configs" / "sequence" / "smoke.yaml").read_text()
    config = smoke.replace(
        "tasks: [bbc-business, bbc-sports, bbc-tech]",
        "tasks:\n  - {name: mine, source: news.csv, text_column: headline, label_column: topic, max_length: 16}\n"
        "  - bbc-tech",
    )
    (tmp_path / "mine.yaml").write_text(config)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "mine.yaml"), "--out", str(out), "--monitor.every_n_val_epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["mine", "bbc-tech"]
    entry = AdapterLibrary(out / "library").get("head", "mine")
    assert entry["config"]["label_names"] == ["money", "sport"]
    assert metrics["accuracy_matrix"][1][0] == metrics["accuracy_matrix"][0][0]
    assert [i["task"] for i in metrics["interim"]] == ["bbc-tech", "bbc-tech"]  # mid-task checks of earlier tasks
    assert all(i["earlier"]["mine"] == metrics["accuracy_matrix"][0][0] for i in metrics["interim"])


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """4 batches of 8 and 8 batches of 4 accumulated in pairs take the same 4 optimizer steps on the same
    examples: the same adapter (up to float summation order; no dropout anywhere)."""
    common = [SMOKE, "--tasks", "[bbc-business]", "--trainer.max_epochs", "1", "--head.dropout", "0"]
    options = {
        "large": ["--trainer.batch_size", "8", "--trainer.limit_train_batches", "4"],
        "accumulated": ["--trainer.batch_size", "4", "--trainer.limit_train_batches", "8"],
        "small": ["--trainer.batch_size", "4", "--trainer.limit_train_batches", "4"],
    }
    options["accumulated"] += ["--trainer.accumulate_grad_batches", "2"]
    tensors = {}
    for name, extra in options.items():
        assert main(["run", *common, *extra, "--out", str(tmp_path / name)]) == 0
        tensors[name] = AdapterLibrary(tmp_path / name / "library").load("adapter", "bbc-business").tensors
    large, accumulated, small = tensors["large"], tensors["accumulated"], tensors["small"]
    assert all(torch.allclose(accumulated[k], large[k], atol=1e-6) for k in large)
    assert not all(torch.allclose(small[k], large[k], atol=1e-6) for k in large)  # the check can tell batches apart


def test_validation_every_n_epochs(tmp_path):
    """``trainer.val_every_n_epochs: 2`` over 4 epochs validates twice (epochs 2 and 4) and keeps the better one."""
    import csv

    out = tmp_path / "val2"
    args = ["run", SMOKE, "--out", str(out), "--tasks", "[bbc-business]", "--trainer.limit_train_batches", "2"]
    assert main([*args, "--trainer.max_epochs", "4", "--trainer.val_every_n_epochs", "2"]) == 0
    rows = list(csv.DictReader((out / "logs" / "bbc-business" / "version_0" / "metrics.csv").open()))
    validated = sorted({int(r["epoch"]) for r in rows if r.get("val_accuracy")})
    assert validated == [1, 3]  # 0-based: the 2nd and 4th epochs
    metrics = json.loads((out / "metrics.json").read_text())
    best = max(float(r["val_accuracy"]) for r in rows if r.get("val_accuracy"))
    assert metrics["per_task"]["bbc-business"]["val_accuracy"] == pytest.approx(best)
