"""`adafuse fuse` on the smoke library: fusion trains, sources untouched, baseline in the same schema."""

import json
from pathlib import Path

import pytest

from adafuse.continual.cli import main
from adafuse.continual.cli.commands import _source_overrides
from adafuse.continual.reporting.schema import FUSION_FIELDS, undocumented
from adafuse.fusion.library import AdapterLibrary

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.xdist_group("fuse")  # one worker: the module-scoped runs are made once


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "run"
    assert main(["run", str(ROOT / "configs/sequence/smoke.yaml"), "--out", str(out)]) == 0
    return out / "library"


def test_fusion_run(library, tmp_path):
    before = {p.name: p.read_bytes() for p in (library / "adapters").iterdir()}
    out = tmp_path / "fusion"
    assert main(["fuse", str(ROOT / "configs/fusion/smoke.yaml"), "--library", str(library), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "fusion" and metrics["sources"] == ["bbc-business", "bbc-sports", "bbc-tech"]
    # before = the score the sequence's monitor recorded for each (sha256-checked) source; after = measured now
    assert metrics["source_accuracy_recorded"] == metrics["source_accuracy_before"]
    assert metrics["source_accuracy_before"] == metrics["source_accuracy_after"]
    assert all(v is not None for v in metrics["source_accuracy_after"].values())
    assert metrics["source_files_unchanged"]
    assert undocumented(FUSION_FIELDS, metrics) == []
    assert {p.name: p.read_bytes() for p in (library / "adapters").iterdir()} == before
    assert len(metrics["attention"]) == 2 and len(metrics["attention"][0]) == 3
    assert abs(sum(metrics["attention"][0]) - 1.0) < 1e-5
    assert (out / "fusion_attention.png").is_file() and (out / "report.md").is_file()
    entry = AdapterLibrary(library).get("fusion", "bbc-topic5-fewshot-fusion")
    assert [s["name"] for s in entry["sources"]] == metrics["sources"]
    assert AdapterLibrary(library).verify() == []


def test_sources_without_a_record_that_holds_are_measured_before_and_after(library, tmp_path):
    """A recorded score holds for the evaluation settings it was measured with: other settings measure twice."""
    out = tmp_path / "fusion"
    config = str(ROOT / "configs/fusion/smoke.yaml")
    args = ["fuse", config, "--library", str(library), "--out", str(out), "--trainer.eval_batch_size", "32"]
    assert main([*args, "--trainer.max_epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["source_accuracy_recorded"].values()) == {None}
    assert metrics["source_accuracy_before"] == metrics["source_accuracy_after"]
    assert all(v is not None for v in metrics["source_accuracy_before"].values())


def test_single_adapter_baseline(library, tmp_path):
    out = tmp_path / "single"
    args = [
        "fuse",
        str(ROOT / "configs/fusion/smoke.yaml"),
        "--library",
        str(library),
        "--out",
        str(out),
        "--baseline",
        "single-adapter",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "single-adapter" and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert set(metrics["validation"]) == {"accuracy", "macro_f1"}


def test_sources_auto_ranks_the_library_and_fuses_the_best_k(library, tmp_path, capsys):
    config = str(ROOT / "configs/fusion/smoke.yaml")
    out = tmp_path / "auto"
    assert (
        main(["fuse", config, "--library", str(library), "--out", str(out), "--sources", "auto", "--top-k", "2"]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    ranking = metrics["ranking"]
    assert ranking["proxy"] == "leep" and ranking["top_k"] == 2 and ranking["examples"] == 40
    names = [row["name"] for row in ranking["sources"]]
    assert sorted(names) == ["bbc-business", "bbc-sports", "bbc-tech"]
    assert metrics["sources"] == names[:2] and [row["chosen"] for row in ranking["sources"]] == [True, True, False]
    scores = [row["leep"] for row in ranking["sources"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    assert "## Source ranking (leep, top 2 chosen" in (out / "report.md").read_text()
    assert [s["name"] for s in AdapterLibrary(library).get("fusion", "bbc-topic5-fewshot-fusion")["sources"]] == names[
        :2
    ]
    capsys.readouterr()
    assert main(["library", "rank", config, "--library", str(library), "--top-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sources"] == ranking["sources"]  # the same ranking, without training anything
    assert main(["library", "rank", config, "--library", str(library), "--proxy", "probe"]) == 0
    text = capsys.readouterr().out
    assert "## Source ranking (probe, top 5 chosen" in text and text.count("| yes |") == 3


def test_top_k_alone_means_auto():
    assert _source_overrides(None, 3) == _source_overrides("auto", 3) == ["--sources", "{auto: 3}"]
    assert _source_overrides(None, None) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sources", "auto", "--top-k", "0"], "--top-k 0: expected an integer >= 1"),
        (["--sources", "all", "--top-k", "2"], "--top-k 2: only with --sources auto"),
        (["--sources", "bbc-business,bbc-nothing"], "has no adapter named 'bbc-nothing'"),
        (["--sources", "auto", "--ranking.proxy", "vibes"], "ranking.proxy: 'vibes' is not one of leep, probe"),
        (["--sources", "auto", "--target", "synthetic-people-places"], "ranks sources for targets with one label"),
    ],
)
def test_bad_source_choices_are_one_line(library, tmp_path, capsys, options, message):
    out = tmp_path / "bad"
    args = ["fuse", str(ROOT / "configs/fusion/smoke.yaml"), "--library", str(library), "--out", str(out), *options]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
