import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adafuse.continual.cli import main
from adafuse.fusion.library import AdapterLibrary

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "adafuse.continual.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("run", "fuse", "report", "library", "tasks"):
        assert command in result.stdout


def test_tasks_list_shows_exact_sizes(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "bbc-business" in out and "1554" in out and "223" in out and "448" in out
    assert "bbc-topic5-fewshot" in out and "    80" in out


def test_tasks_export_sequence(tmp_path, capsys):
    assert main(["tasks", "export", "bbc-topics", "--out", str(tmp_path)]) == 0
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["bbc-business", "bbc-entertainment", "bbc-politics", "bbc-sports", "bbc-tech"]
    for folder in folders:
        rows = (tmp_path / folder / "test.jsonl").read_text().splitlines()
        assert len(rows) == 448
        assert set(json.loads(rows[0])) == {"text", "label", "label_name"}


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "adafuse.continual.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (["tasks", "export", "bbc-weather", "--out", "{tmp}/x"], "unknown task 'bbc-weather'"),
        (["run", "configs/sequence/smoke.yaml", "--out", "{tmp}/x", "--trainer.max_epoch", "1"], "unknown key"),
        (["run", "{tmp}/missing.yaml", "--out", "{tmp}/x"], "config file not found"),
        (["library", "list", "{tmp}"], "not an adapter library"),
        (
            ["fuse", "configs/fusion/smoke.yaml", "--library", "{tmp}/nolib", "--out", "{tmp}/x"],
            "not an adapter library",
        ),
        (["report", "{tmp}"], "metrics.json: not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, match):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_library_verify_exit_codes(tmp_path, capsys):
    library = AdapterLibrary(tmp_path)
    library.add("adapter", "a", {"w": torch.ones(4)}, fingerprint="f" * 64)
    assert main(["library", "verify", str(tmp_path)]) == 0
    assert main(["library", "list", str(tmp_path)]) == 0
    assert main(["library", "show", str(tmp_path), "a"]) == 0
    (tmp_path / "adapters" / "a.safetensors").write_bytes(b"\x00" * 10)
    assert main(["library", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "a.safetensors" in out.out and "verification failed" in out.err
