"""PEFT interop for LoRA, checked with PEFT itself (a test-only dependency): adafuse -> PEFT and PEFT -> adafuse
give the same hidden states within 1e-5; unsupported PEFT options are refused with one line naming them."""

import json

import pytest
import torch
from conftest import tiny_backbone, tiny_batch

from adafuse.continual.cli import main
from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.fusion.kinds import AdapterConfig

peft = pytest.importorskip("peft")


@pytest.fixture(params=["bert", "llama"])
def saved_backbone(request, tmp_path):
    """A tiny random backbone saved as a local folder (what a Hub name resolves to), with the embedded tokenizer."""
    folder = tmp_path / request.param
    tiny_backbone(request.param).save_pretrained(folder)
    return request.param, folder


def _hidden(module, batch) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(**batch).last_hidden_state


def test_adafuse_lora_loads_in_peft_with_the_same_outputs(saved_backbone, tmp_path):
    from transformers import AutoModel

    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.fingerprint import fingerprint
    from adafuse.fusion.library import AdapterLibrary
    from adafuse.fusion.model import AdaptedModel

    _, folder = saved_backbone
    backbone = load_model(BackboneConfig(name=str(folder)))
    record = {"fingerprint": fingerprint(backbone), "backbone": {"name": str(folder)}}
    model = AdaptedModel(backbone)
    lora = AdapterConfig(kind="lora", r=4, alpha=12, target_modules=["q", "v", "ffn_out"])
    model.add_adapter("mine", lora)
    with torch.no_grad():  # a trained-looking adapter (B is zero at init); the backbone stays as saved
        for name, param in model.named_parameters():
            if ".adapters.mine." in name:
                param.normal_(std=0.1)
    library = AdapterLibrary(tmp_path / "library")
    library.add("adapter", "mine", model.adapter_state("mine"), config={"adapter": lora.__dict__}, **record)
    out = tmp_path / "peft"
    args = ["library", "export", "mine", "--library", str(library.root), "--to", "peft", "--out", str(out)]
    assert main([*args, "--backbone", str(folder)]) == 0
    batch = {k: v for k, v in tiny_batch().items() if k != "token_type_ids"}
    theirs = _hidden(peft.PeftModel.from_pretrained(AutoModel.from_pretrained(folder), out), batch)
    model.activate(["mine"])
    model.eval()
    with torch.no_grad():
        ours = model.encode(**batch)
    assert (ours - theirs).abs().max() < 1e-5
    assert (theirs - _hidden(AutoModel.from_pretrained(folder), batch)).abs().max() > 1e-3  # the delta matters


def test_peft_trained_lora_imports_with_the_same_outputs(saved_backbone, tmp_path):
    from transformers import AutoModel

    model_type, folder = saved_backbone
    targets = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj", "down_proj"]}[model_type]
    wrapped = peft.get_peft_model(
        AutoModel.from_pretrained(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    wrapped.save_pretrained(tmp_path / "peft")
    batch = {k: v for k, v in tiny_batch().items() if k != "token_type_ids"}
    theirs = _hidden(wrapped, batch)
    library = tmp_path / "library"
    args = ["library", "import", str(tmp_path / "peft"), "--from", "peft", "--library", str(library)]
    assert main([*args, "--backbone", str(folder), "--name", "theirs"]) == 0
    opened = LibraryModel.open(library, str(folder))
    opened.load_adapter("theirs")
    opened.model.activate(["theirs"])
    opened.model.eval()
    with torch.no_grad():
        ours = opened.model.encode(**batch)
    assert (ours - theirs).abs().max() < 1e-5
    entry = opened.library.get("adapter", "theirs")["config"]["adapter"]
    assert entry["kind"] == "lora" and entry["r"] == 4 and entry["alpha"] == 8.0


@pytest.mark.parametrize(
    "option", [{"use_dora": True}, {"bias": "all"}, {"modules_to_save": ["classifier"]}, {"peft_type": "IA3"}]
)
def test_unsupported_peft_options_are_refused_by_name(tmp_path, capsys, option):
    from transformers import AutoModel

    folder = tmp_path / "bert"
    tiny_backbone("bert").save_pretrained(folder)
    wrapped = peft.get_peft_model(AutoModel.from_pretrained(folder), peft.LoraConfig(r=2, target_modules=["query"]))
    wrapped.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) | option
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    args = ["library", "import", str(tmp_path / "peft"), "--from", "peft", "--library", str(tmp_path / "lib")]
    capsys.readouterr()  # what saving the PEFT model printed
    assert main([*args, "--backbone", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported PEFT options" in err and next(iter(option)) in err and "\n" not in err
    assert not (tmp_path / "lib" / "manifest.json").exists()
