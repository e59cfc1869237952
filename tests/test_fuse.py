"""`adafuse fuse` on the smoke library: fusion trains, sources untouched, baseline in the same schema."""

import json
from pathlib import Path

import pytest

from adafuse.continual.cli import main
from adafuse.fusion.library import AdapterLibrary

ROOT = Path(__file__).resolve().parents[1]


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
    assert metrics["source_accuracy_before"] == metrics["source_accuracy_after"]
    assert all(v is not None for v in metrics["source_accuracy_after"].values())
    assert metrics["source_files_unchanged"]
    assert {p.name: p.read_bytes() for p in (library / "adapters").iterdir()} == before
    assert len(metrics["attention"]) == 2 and len(metrics["attention"][0]) == 3
    assert abs(sum(metrics["attention"][0]) - 1.0) < 1e-5
    assert (out / "fusion_attention.png").is_file() and (out / "report.md").is_file()
    entry = AdapterLibrary(library).get("fusion", "bbc-topic5-fewshot-fusion")
    assert [s["name"] for s in entry["sources"]] == metrics["sources"]
    assert AdapterLibrary(library).verify() == []


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
