"""Kill -9 at exact places (``ADAFUSE_FAULT``), then re-run the same command: the run completes, finished
work is byte-identical, and the final metrics equal an uninterrupted run's. NaN losses, read-only output."""

import json
import os
import signal
from pathlib import Path

import pytest
from cli_process import run_cli
from conftest import stable

from adafuse.continual.cli import main
from adafuse.fusion.library import AdapterLibrary

pytestmark = pytest.mark.xdist_group("faults")  # one worker: the reference runs are made once
ROOT = Path(__file__).resolve().parents[1]
SMOKE = [str(ROOT / "configs" / "sequence" / "smoke.yaml"), "--trainer.limit_train_batches", "4",
         "--tasks", "[bbc-business, bbc-sports]"]  # fmt: skip
FUSE = [str(ROOT / "configs" / "fusion" / "smoke.yaml"), "--trainer.max_epochs", "3"]


def cli(*args, fault=None):
    """``adafuse ARGS`` in a process of its own (killable), with ``ADAFUSE_FAULT`` set only when asked."""
    return run_cli(*args, env={"ADAFUSE_FAULT": fault} if fault else None)


def finished_files(library: Path) -> dict[str, bytes]:
    """Every file the library's manifest lists (what a kill must never change)."""
    if not (library / "manifest.json").is_file():
        return {}
    return {e["file"]: (library / e["file"]).read_bytes() for e in AdapterLibrary(library).entries()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert main(["run", *SMOKE, "--out", str(out)]) == 0
    assert main(["fuse", *FUSE, "--library", str(out / "library"), "--out", str(out / "fusion")]) == 0
    return out


# smoke's first two tasks, 4 batches a task, 2 epochs: steps 1-8 are task 1, 9-16 task 2; last.ckpt is written at
# most once an epoch, and each task writes the manifest three times (adapter, head, then the monitor's test score
# in the adapter's entry)
SEQUENCE_FAULTS = {
    "tokenize": "tokenisation/caching of the first split",
    "train-step:11": "mid-epoch 1 of task 2",
    "write:last.ckpt:2": "inside the second checkpoint write",
    "write:manifest.json:4": "task 2's adapter file written, its manifest entry not yet",
    "write:report.md": "writing the report at the end",
}


@pytest.mark.parametrize("fault", list(SEQUENCE_FAULTS))
def test_sequence_killed_then_rerun_completes_identically(reference, tmp_path, fault):
    out = tmp_path / "run"
    killed = cli("run", *SMOKE, "--out", str(out), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = finished_files(out / "library")
    assert not (out / "metrics.json").exists() or fault == "write:report.md"
    dead = int((out / ".run.lock").read_text())  # the killed holder's pid: a stale lock, taken over below
    assert dead != os.getpid() and not Path(f"/proc/{dead}").exists()
    rerun = cli("run", *SMOKE, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = finished_files(out / "library")
    assert {k: after[k] for k in before} == before
    assert AdapterLibrary(out / "library").verify() == []
    expected = json.loads((reference / "metrics.json").read_text())
    assert stable(json.loads((out / "metrics.json").read_text())) == stable(expected)
    assert (out / "report.md").is_file() and (out / "accuracy_matrix.png").is_file()


@pytest.mark.parametrize("fault", ["train-step:5", "write:bbc-topic5-fewshot-fusion.safetensors"])
def test_fuse_killed_then_rerun_completes_identically(reference, tmp_path, fault):
    import shutil

    library = tmp_path / "library"
    shutil.copytree(reference / "library", library)
    for path in (library / "fusions").glob("*"):  # start from the sequence's library, without the fusion
        path.unlink()
    manifest = json.loads((library / "manifest.json").read_text())
    manifest["artefacts"] = [e for e in manifest["artefacts"] if "fusion" not in e["name"]]
    (library / "manifest.json").write_text(json.dumps(manifest))
    sources = finished_files(library)
    out = tmp_path / "fusion"
    killed = cli("fuse", *FUSE, "--library", str(library), "--out", str(out), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert cli("fuse", *FUSE, "--library", str(library), "--out", str(out)).returncode == 0
    assert {k: v for k, v in finished_files(library).items() if k in sources} == sources
    assert AdapterLibrary(library).verify() == []
    expected = json.loads((reference / "fusion" / "metrics.json").read_text())
    assert stable(json.loads((out / "metrics.json").read_text())) == stable(expected)


def test_nan_loss_stops_the_task_and_writes_nothing_of_it(reference, tmp_path):
    out = tmp_path / "nan"
    library = tmp_path / "library"
    first = ["run", SMOKE[0], "--out", str(out), "--library", str(library), "--trainer.limit_train_batches", "4"]
    assert main([*first, "--tasks", "[bbc-business]"]) == 0
    kept = finished_files(library)
    result = cli(*first, "--trainer.lr", "1e20", "--trainer.gradient_clip_val", "null")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training loss became" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert finished_files(library) == kept and AdapterLibrary(library).verify() == []
    assert not (out / "checkpoints" / "bbc-sports").exists()  # the diverged run is not resumed later


def test_disk_full_is_a_clean_error_and_the_library_stays(reference, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    import adafuse.fusion.storage as storage

    library = tmp_path / "library"
    shutil.copytree(reference / "library", library)
    before = finished_files(library)
    manifest = (library / "manifest.json").read_bytes()
    real_replace = os.replace

    def full_disk(source, target):
        if Path(target).parent.parent == library or Path(target).parent == library:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(source, target)

    monkeypatch.setattr(storage.os, "replace", full_disk)
    args = ["run", *SMOKE, "--out", str(tmp_path / "out"), "--library", str(library), "--tasks", "[bbc-politics]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "No space left on device" in err[0], err
    assert finished_files(library) == before and (library / "manifest.json").read_bytes() == manifest
    assert not [p for p in library.rglob("*.tmp")] and AdapterLibrary(library).verify() == []


@pytest.mark.parametrize("where", ["out", "library"])
def test_busy_out_or_library_is_refused_naming_the_holder(reference, tmp_path, where):
    from adafuse.fusion.storage import FileLock

    folders = {"out": tmp_path / "out", "library": tmp_path / "library"}
    with FileLock(folders[where] / ".run.lock"):
        result = cli("run", *SMOKE, "--out", str(folders["out"]), "--library", str(folders["library"]))
    assert result.returncode == 2 and f"pid {os.getpid()}" in result.stderr
    assert str(folders[where]) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (folders["library"] / "manifest.json").exists()
