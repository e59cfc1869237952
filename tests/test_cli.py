import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_process import run_cli

from adafuse.continual.cli import main
from adafuse.fusion.library import AdapterLibrary

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_argument_errors_answer_before_torch_loads():
    """``adafuse --help`` and a command line that does not parse import neither torch, transformers nor
    Lightning (seconds of imports before the first line)."""
    code = (
        "import sys\nfrom adafuse.continual.cli import main\nassert main(['run']) == 2\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]" and "the following arguments are required: config" in result.stderr


def test_help_lists_subcommands():
    result = run_cli("--help")  # `python -m adafuse.continual.cli` itself: the DDP runs in test_scale start it
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


def _make_inputs(tmp):
    """Files the bad-input cases below point at."""
    (tmp / "afile").write_text("not a folder")
    (tmp / "broken.yaml").write_text("trainer: [lr: 1\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    empty = AdapterLibrary(tmp / "empty")
    empty.add("head", "h", {"w": torch.ones(2)}, fingerprint="e" * 64)  # a library without adapters
    foreign = AdapterLibrary(tmp / "foreign")
    foreign.add("adapter", "bbc-business", {"w": torch.ones(2)}, fingerprint="f" * 64, config={"adapter": {}})


SMOKE_RUN = "configs/sequence/smoke.yaml"
SMOKE_FUSE = "configs/fusion/smoke.yaml"


@pytest.mark.parametrize(
    "args,match",
    [
        (["run", "{tmp}/broken.yaml", "--out", "{tmp}/x"], "not valid YAML"),
        (["run", "{tmp}/list.yaml", "--out", "{tmp}/x"], "expected a mapping at the top level"),
        (["run", SMOKE_RUN, "--out", "{tmp}/x", "--trainer.max_epochs", "two"], "'two' is not a int"),
        (["run", SMOKE_RUN, "--out", "{tmp}/x", "--trainer.batch_size", "0"], "trainer.batch_size: 0 is out of range"),
        (["run", SMOKE_RUN, "--out", "{tmp}/x", "--trainer.lr", "-0.1"], "trainer.lr: -0.1 is out of range"),
        (["run", SMOKE_RUN, "--out", "{tmp}/x", "--adapter.reduction_factor", "0"], "reduction_factor: 0 must be"),
        (["run", SMOKE_RUN, "--out", "{tmp}/x", "--method", "magic"], "method: 'magic' is not one of"),
        (["run", SMOKE_RUN, "--out", "{tmp}/x", "--trainer.lr"], "has no value"),
        (["run", SMOKE_RUN, "--out", "{tmp}/afile"], "is a file; expected a folder"),
        (["fuse", SMOKE_FUSE, "--library", "{tmp}/empty", "--out", "{tmp}/x"], "holds no adapters to fuse"),
        (
            ["fuse", SMOKE_FUSE, "--library", "{tmp}/foreign", "--out", "{tmp}/x"],
            "belongs to backbone ffffffffffffffff",
        ),
        (["fuse", SMOKE_FUSE, "--library", "{tmp}/foreign", "--out", "{tmp}/x", "--sources", "[nope]"], "no adapter"),
        (["fuse", SMOKE_FUSE, "--library", "{tmp}/foreign", "--out", "{tmp}/x", "--fusion.dropout", "2"], "dropout"),
        (["library", "show", "{tmp}/empty", "nope"], "has no artefact named 'nope'"),
        (["library", "export", "nope", "--library", "{tmp}/empty", "--out", "{tmp}/x"], "no adapter, fusion or head"),
        (["library", "import", "{tmp}/afile", "--library", "{tmp}/x"], "not a folder"),
        (["library", "import", "{tmp}", "--library", "{tmp}/x"], "none of adapter_config.json"),
        (["library", "verify", "{tmp}/afile"], "not found"),
        (["library", "list", "{tmp}/empty", "--bogus"], "unrecognized arguments: --bogus"),
        (["predict", "--library", "{tmp}/empty", "--input", "{tmp}/missing.txt", "--out", "{tmp}/x"], "--adapter"),
        (["predict", "--library", "{tmp}/x", "--adapter", "a", "--input", "{tmp}/afile", "--out", "{tmp}/x/p"], "not"),
        (["tasks", "frob"], "invalid choice: 'frob'"),
        (["report", "{tmp}/afile"], "not found"),
    ],
)
def test_more_bad_inputs_one_line_exit_2(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(ROOT)
    _make_inputs(tmp_path)
    capsys.readouterr()
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], (code, err)
    assert not (tmp_path / "x").exists()


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    from adafuse.fusion.errors import UserError

    with pytest.raises(UserError, match="not an adapter library"):
        main(["--debug", "library", "list", str(tmp_path)])
    monkeypatch.setenv("ADAFUSE_DEBUG", "1")
    with pytest.raises(UserError):
        main(["library", "list", str(tmp_path)])


def test_internal_error_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    from adafuse.continual.cli import commands

    def broken(args, overrides=()):
        raise RuntimeError("something\nmulti-line")

    monkeypatch.setattr(commands, "cmd_library_list", broken)
    assert main(["library", "list", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adafuse: internal error: RuntimeError: something (run again with --debug for the traceback)"]
