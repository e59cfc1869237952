from pathlib import Path

import pytest
from cli_process import spawn_ranks
from conftest import TINY, tiny_backbone

from adafuse.fusion.backbone import BackboneConfig, load_model, load_tokenizer
from adafuse.fusion.errors import UserError
from adafuse.fusion.fingerprint import fingerprint


def test_loaded_backbone_is_frozen_and_in_eval_mode():
    model = tiny_backbone()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def _fingerprint_to(_rank: int, path: str) -> None:
    Path(path).write_text(fingerprint(tiny_backbone("bert")))


def test_fingerprint_is_stable_across_processes(tmp_path):
    spawn_ranks(_fingerprint_to, 1, str(tmp_path / "other"))  # another interpreter: its own hash seed
    other = (tmp_path / "other").read_text()
    assert other == fingerprint(tiny_backbone("bert"))
    assert fingerprint(tiny_backbone("bert", seed=1)) != other


def test_local_folder_loads_like_a_hub_name(tmp_path):
    model = tiny_backbone("roberta")
    model.save_pretrained(tmp_path / "saved")
    loaded = load_model(BackboneConfig(name=str(tmp_path / "saved")))
    assert fingerprint(loaded) == fingerprint(model)


def test_missing_folder_and_offline_hub_name_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such folder"):
        load_model(BackboneConfig(name=str(tmp_path / "nothing-here")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Hub name"):
        load_model(BackboneConfig(name="someone/not-a-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(BackboneConfig(name=str(tmp_path / "empty")))


def test_random_init_needs_a_model_type():
    with pytest.raises(UserError, match="model_type"):
        load_model(BackboneConfig(random_init=dict(TINY["bert"])))


@pytest.mark.minilm
def test_embedded_minilm_and_tokenizer():
    model = load_model(BackboneConfig())
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    tokenizer = load_tokenizer(BackboneConfig())
    assert tokenizer("hello world")["input_ids"][0] == 101
