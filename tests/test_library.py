import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from adafuse.fusion.errors import UserError, VerificationError
from adafuse.fusion.library import AdapterLibrary

FP = "a" * 64


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"0.output.down.weight": torch.randn(4, 16, generator=g), "0.output.up.bias": torch.randn(16, generator=g)}


def test_round_trip_is_exact(tmp_path):
    library = AdapterLibrary(tmp_path / "lib")
    tensors = _tensors()
    library.add("adapter", "task-a", tensors, fingerprint=FP, config={"r": 4}, task="task-a", metrics={"acc": 0.9})
    loaded = AdapterLibrary(tmp_path / "lib").load("adapter", "task-a", FP)
    assert loaded.tensors.keys() == tensors.keys()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in tensors.items())
    assert loaded.entry["config"] == {"r": 4} and loaded.entry["metrics"] == {"acc": 0.9}
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert manifest["backbone"]["fingerprint"] == FP and manifest["format"] == "adafuse-library"
    assert library.verify() == []


def test_flipped_byte_caught_by_verify_and_load(tmp_path):
    library = AdapterLibrary(tmp_path)
    library.add("adapter", "a", _tensors(), fingerprint=FP)
    path = tmp_path / "adapters" / "a.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    problems = library.verify()
    assert len(problems) == 1 and "sha256 mismatch" in problems[0] and "a.safetensors" in problems[0]
    with pytest.raises(VerificationError, match="sha256"):
        library.load("adapter", "a", FP)


def test_wrong_backbone_refused_naming_both(tmp_path):
    library = AdapterLibrary(tmp_path)
    library.add("adapter", "a", _tensors(), fingerprint=FP)
    with pytest.raises(UserError, match="aaaaaaaa.*bbbbbbbb"):
        library.load("adapter", "a", "b" * 64)
    with pytest.raises(UserError, match="belongs to backbone"):
        library.add("adapter", "other", _tensors(), fingerprint="b" * 64)


@pytest.mark.parametrize(
    "damage", ["missing", "extra", "truncated", "not-json", "schema", "traversal", "absolute", "symlink", "header"]
)
def test_verify_catches(tmp_path, damage):
    root = tmp_path / "lib"
    library = AdapterLibrary(root)
    library.add("adapter", "a", _tensors(), fingerprint=FP)
    path = root / "adapters" / "a.safetensors"
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "extra":
        (root / "adapters" / "stray.safetensors").write_bytes(b"x")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "not-json":
        manifest_path.write_text("{not json")
    elif damage == "schema":
        manifest_path.write_text(json.dumps({"format": "adafuse-library", "version": 1, "artefacts": [{"name": "a"}]}))
    elif damage in ("traversal", "absolute"):
        (tmp_path / "outside.safetensors").write_bytes(path.read_bytes())
        manifest["artefacts"][0]["file"] = (
            "../outside.safetensors" if damage == "traversal" else str(tmp_path / "outside.safetensors")
        )
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "a.safetensors").write_bytes(path.read_bytes())
        path.unlink()
        (root / "adapters").rmdir()
        (root / "adapters").symlink_to(tmp_path / "elsewhere")
    elif damage == "header":
        data = path.read_bytes()
        forged = (2**40).to_bytes(8, "little") + data[8:]
        path.write_bytes(forged)
        manifest["artefacts"][0]["sha256"] = __import__("hashlib").sha256(forged).hexdigest()
        manifest_path.write_text(json.dumps(manifest))
    problems = library.verify()
    assert problems, damage
    if damage != "extra":  # loading refuses everything but a stray file (which it never reads)
        with pytest.raises((VerificationError, UserError)):
            library.load("adapter", "a", FP)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from adafuse.fusion import library as lib
    from adafuse.fusion.library import AdapterLibrary
    original = lib.atomic_write
    def slow(path, data):
        if path.name == "manifest.json":
            print("between", flush=True)
            import time; time.sleep(30)
        original(path, data)
    lib.atomic_write = slow
    AdapterLibrary(sys.argv[1]).add("adapter", "b", {"w": torch.ones(3)}, fingerprint="a" * 64)
    """
)


def test_writer_killed_between_file_and_manifest_leaves_previous_library(tmp_path):
    library = AdapterLibrary(tmp_path)
    library.add("adapter", "a", _tensors(), fingerprint=FP)
    before = (tmp_path / "manifest.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "between"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert [e["name"] for e in library.entries()] == ["a"]
    assert torch.equal(library.load("adapter", "a", FP).tensors["0.output.up.bias"], _tensors()["0.output.up.bias"])
    # the orphaned adapter file is reported by verify, and a re-run of the write repairs the library
    assert any("b.safetensors" in p for p in library.verify())
    library.add("adapter", "b", {"w": torch.ones(3)}, fingerprint=FP)
    assert library.verify() == []


def test_concurrent_writers_keep_both(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from adafuse.fusion.library import AdapterLibrary
        for i in range(5):
            AdapterLibrary(sys.argv[1]).add("adapter", f"{sys.argv[2]}{i}", {"w": torch.full((64,), float(i))},
                                            fingerprint="a" * 64)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), p]) for p in ("x", "y")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    library = AdapterLibrary(tmp_path)
    assert sorted(e["name"] for e in library.entries()) == [f"{p}{i}" for p in "xy" for i in range(5)]
    assert library.verify() == []


def test_lock_held_by_a_thread_serialises(tmp_path):
    from adafuse.fusion.storage import FileLock

    order = []
    lock = FileLock(tmp_path / ".lock")
    lock.acquire()

    def other():
        with FileLock(tmp_path / ".lock"):
            order.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.2)
    order.append("first")
    lock.release()
    thread.join(5)
    assert order == ["first", "other"]
    with FileLock(tmp_path / ".lock"), pytest.raises(UserError, match=f"pid {os.getpid()}"):
        FileLock(tmp_path / ".lock", blocking=False).acquire()


def test_bad_names_refused(tmp_path):
    with pytest.raises(UserError, match="artefact name"):
        AdapterLibrary(tmp_path).add("adapter", "../evil", _tensors(), fingerprint=FP)


def test_files_get_the_permissions_of_a_plain_write(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        AdapterLibrary(tmp_path).add("adapter", "a", _tensors(), fingerprint=FP)
    finally:
        os.umask(umask)
    for path in (tmp_path / "manifest.json", tmp_path / "adapters" / "a.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path  # readable by the people the library is shared with
