"""Placement and fusion parity with AdapterHub `adapters` 1.3.0 (the fixtures' logits are the ground truth)."""

import json
import pickle

import pytest
import torch

from adafuse.fusion.backbone import BackboneConfig, load_model
from adafuse.fusion.errors import UserError
from adafuse.fusion.formats.adapterhub_read import head_tensors, load_tensors, read_adapter_folder, read_fusion_folder
from adafuse.fusion.model import AdaptedModel

pytestmark = pytest.mark.minilm
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def minilm():
    return AdaptedModel(load_model(BackboneConfig()))


@pytest.fixture(scope="module")
def expected(request):
    from conftest import FIXTURES

    if not FIXTURES.is_dir():
        pytest.skip(f"AdapterHub fixtures not found at {FIXTURES}")
    return json.loads((FIXTURES / "expected_logits.json").read_text())


def _logits(model, expected):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"]))


def _add(model, imported):
    if imported["name"] not in model.adapter_configs:
        model.add_adapter(imported["name"], imported["config"])
    model.load_adapter_state(imported["name"], imported["tensors"])
    head = imported["head"]
    model.add_head(imported["name"], head["num_labels"])
    model.load_head_state(imported["name"], head["tensors"])


@pytest.mark.parametrize("folder", ["task_a", "task_b", "task_h", "task_a_pickle"])
def test_imported_adapter_reproduces_adapterhub_logits(minilm, expected, fixtures_dir, folder):
    imported = read_adapter_folder(fixtures_dir / folder, minilm.site_paths)
    _add(minilm, imported)
    minilm.activate([imported["name"]], head=imported["name"])
    error = (_logits(minilm, expected) - torch.tensor(expected["logits"][imported["name"]])).abs().max().item()
    assert error < TOLERANCE, error


def test_houlsby_fixture_maps_to_both_locations(minilm, fixtures_dir):
    imported = read_adapter_folder(fixtures_dir / "task_h", minilm.site_paths)
    assert imported["config"].placement == "houlsby" and imported["config"].non_linearity == "swish"
    assert {k.split(".")[1] for k in imported["tensors"]} == {"attention", "output"}


def test_bare_backbone_with_head_matches(minilm, expected, fixtures_dir):
    _add(minilm, read_adapter_folder(fixtures_dir / "task_a", minilm.site_paths))
    minilm.activate([], head="task_a")
    error = (_logits(minilm, expected) - torch.tensor(expected["logits"]["no_adapter_head_task_a"])).abs().max().item()
    assert error < TOLERANCE
    # and the adapters matter: with the adapter the logits are far from the bare ones
    minilm.activate(["task_a"], head="task_a")
    assert (_logits(minilm, expected) - torch.tensor(expected["logits"]["no_adapter_head_task_a"])).abs().max() > 0.01


def test_imported_fusion_reproduces_adapterhub_logits(minilm, expected, fixtures_dir):
    for folder in ("task_a", "task_b"):
        _add(minilm, read_adapter_folder(fixtures_dir / folder, minilm.site_paths))
    fusion = read_fusion_folder(fixtures_dir / "fusion_task_a_task_b", minilm.site_paths)
    assert fusion["sources"] == ["task_a", "task_b"]
    minilm.add_fusion(fusion["name"], fusion["sources"], fusion["config"])
    minilm.load_fusion_state(fusion["name"], fusion["tensors"])
    minilm.add_head(fusion["name"], fusion["head"]["num_labels"])
    minilm.load_head_state(fusion["name"], fusion["head"]["tensors"])
    minilm.activate(fusion=fusion["name"], head=fusion["name"])
    error = (_logits(minilm, expected) - torch.tensor(expected["logits"]["fusion_task_a_task_b"])).abs().max().item()
    assert error < TOLERANCE, error


def test_head_keys_selected_by_exact_name(fixtures_dir):
    tensors = load_tensors(fixtures_dir / "task_a", "model_head")
    assert any(k.startswith("heads.task_a,task_b.") for k in tensors)  # the quirk is really there
    assert set(head_tensors(tensors, "task_a")) == {"1.weight", "1.bias", "4.weight", "4.bias"}


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "pytorch_adapter.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    with pytest.raises(UserError, match="refused"):
        load_tensors(folder, "adapter")
    assert not (tmp_path / "PWNED").exists()
