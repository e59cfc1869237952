"""``adafuse library import/export`` against AdapterHub `adapters` 1.3.0 fixtures (real MiniLM backbone)."""

import json
import pickle
import shutil
import struct

import pytest
import torch

from adafuse.continual.cli import main
from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.fusion.library import AdapterLibrary

pytestmark = pytest.mark.minilm
FOLDERS = ["task_a", "task_b", "task_h", "fusion_task_a_task_b"]


def _import(folder, library, *extra):
    return main(["library", "import", str(folder), "--from", "adapterhub", "--library", str(library), *extra])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from conftest import FIXTURES

    if not FIXTURES.is_dir():
        pytest.skip(f"AdapterHub fixtures not found at {FIXTURES}")
    library = tmp_path_factory.mktemp("interop") / "library"
    for folder in FOLDERS:
        assert _import(FIXTURES / folder, library) == 0
    assert _import(FIXTURES / "task_a_pickle", library, "--name", "task_a_pickle") == 0
    return library


def _logits(opened, expected, adapter=None, fusion=None, head=None):
    if fusion:
        opened.load_fusion(fusion)
    else:
        opened.load_adapter(adapter)
    opened.load_head(head)
    opened.model.activate([adapter] if adapter else [], fusion=fusion, head=head)
    opened.model.eval()
    with torch.no_grad():
        return opened.model(torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"]))


def test_imported_library_reproduces_adapterhub_logits(imported, fixtures_dir):
    expected = json.loads((fixtures_dir / "expected_logits.json").read_text())
    opened = LibraryModel.open(imported)
    cases = {
        "task_a": dict(adapter="task_a", head="task_a"),
        "task_b": dict(adapter="task_b", head="task_b"),
        "task_h": dict(adapter="task_h", head="task_h"),
        "fusion_task_a_task_b": dict(fusion="task_a,task_b", head="task_a,task_b"),
    }
    for key, selection in cases.items():
        error = (_logits(opened, expected, **selection) - torch.tensor(expected["logits"][key])).abs().max().item()
        assert error < 1e-4, (key, error)
    pickled = _logits(opened, expected, adapter="task_a_pickle", head="task_a_pickle")
    assert torch.equal(pickled, _logits(opened, expected, adapter="task_a", head="task_a"))
    assert AdapterLibrary(imported).verify() == []
    assert opened.label_names["task_a"] == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_export_then_import_is_exact(imported, tmp_path):
    second = tmp_path / "second"
    for name in ("task_a", "task_b", "task_h", "task_a,task_b"):
        assert (
            main(
                [
                    "library",
                    "export",
                    name,
                    "--library",
                    str(imported),
                    "--to",
                    "adapterhub",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    for name in ("task_a", "task_b", "task_h", "task_a,task_b"):
        assert _import(tmp_path / name, second) == 0
    first, again = AdapterLibrary(imported), AdapterLibrary(second)
    for entry in again.entries():
        ours = again.load(entry["kind"], entry["name"]).tensors
        theirs = first.load(entry["kind"], entry["name"]).tensors
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), entry["name"]
    exported = json.loads((tmp_path / "task_h" / "adapter_config.json").read_text())
    assert exported["config"]["mh_adapter"] and exported["config"]["non_linearity"] == "swish"
    assert exported["config"]["reduction_factor"] == 16 and exported["model_type"] == "bert"


def _one_line_error(capsys, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_adapter_for_another_architecture_is_refused(fixtures_dir, tmp_path, capsys):
    folder = tmp_path / "wide"
    shutil.copytree(fixtures_dir / "task_a", folder)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["hidden_size"] = 768
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    assert _import(folder, tmp_path / "lib") == 2
    _one_line_error(capsys, "hidden size 768, but the library's backbone is bert with hidden size 384")
    assert not (tmp_path / "lib" / "manifest.json").exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (struct.pack("<Q", 10**15) + b"{}", "malformed safetensors header (declares 1000000000000000 bytes)"),
        (b"\x03\x00", "truncated safetensors file (2 bytes)"),
        (struct.pack("<Q", 2) + b"{}" + b"junk", "malformed safetensors file"),
    ],
)
def test_a_damaged_safetensors_file_is_one_line_exit_2(fixtures_dir, tmp_path, capsys, content, match):
    """The import reads a foreign file under the library's bounded header check: exit 2 naming the file."""
    folder = tmp_path / "damaged"
    shutil.copytree(fixtures_dir / "task_a", folder)
    (folder / "adapter.safetensors").write_bytes(content)
    assert _import(folder, tmp_path / "lib") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and f"{folder / 'adapter.safetensors'}:" in err[0], err
    assert not (tmp_path / "lib" / "manifest.json").exists()


def test_fusion_before_its_sources_is_refused(fixtures_dir, tmp_path, capsys):
    assert _import(fixtures_dir / "fusion_task_a_task_b", tmp_path / "lib") == 2
    _one_line_error(capsys, "source adapter 'task_a' is not in the library; import it first")


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_import_refused(fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(fixtures_dir / "task_a" / "adapter_config.json", folder)
    (folder / "pytorch_adapter.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    assert _import(folder, tmp_path / "lib") == 2
    _one_line_error(capsys, "refused to load (only plain tensors are accepted)")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "lib" / "manifest.json").exists()


def test_export_refuses_a_non_empty_out(imported, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["library", "export", "task_a", "--library", str(imported), "--out", str(tmp_path / "full")]) == 2
    _one_line_error(capsys, "exists and is not an empty folder")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_import_never_overwrites(imported, fixtures_dir, capsys):
    before = (imported / "manifest.json").read_bytes()
    assert _import(fixtures_dir / "task_b", imported) == 2
    _one_line_error(capsys, "already has an adapter named 'task_b'; import it with --name NEW")
    assert (imported / "manifest.json").read_bytes() == before
