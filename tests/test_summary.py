"""The closing summary of `make demo`: the sequence, the fusion, its single-adapter baseline and the gain."""

import json

from adafuse.continual.reporting.summary import summary


def _write(folder, metrics):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_summary_prints_fusion_baseline_and_gain(tmp_path):
    per_task = {"a": {"final_accuracy": 0.9}, "b": {"final_accuracy": 0.8}}
    _write(tmp_path / "sequence", {"method": "adapters", "tasks": ["a", "b"], "per_task": per_task,
                                   "acc": 0.85, "bwt": 0.0, "forgetting": 0.0})  # fmt: skip
    sources = {"a": 0.9, "b": 0.8}
    fusion = {"method": "fusion", "target": "t", "test": {"accuracy": 0.94}, "source_accuracy_before": sources,
              "source_accuracy_after": sources}  # fmt: skip
    _write(tmp_path / "fusion", fusion)
    _write(tmp_path / "single-adapter", {"method": "single-adapter", "target": "t", "test": {"accuracy": 0.89}})
    text = summary(tmp_path)
    assert "fusion 0.9400, single adapter 0.8900, gain +5.0 points" in text
    assert "source accuracies unchanged: True" in text and "ACC 0.8500" in text
