"""Backbones beyond BERT: AdapterHub parity on GPT-2, Llama, T5 and ViT (``adapterhub-breadth`` fixtures:
logits to 1e-5 after ``library import``, export bit-exact) and the invariants on every tiny architecture."""

import json

import pytest
import torch
from conftest import BREADTH, ROOT, TINY_BEYOND_BERT, bare_hidden, randomize, tiny_backbone, tiny_batch
from safetensors.torch import load_file

from adafuse.continual.jobs.interop import export_adapterhub, import_adapterhub
from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.fusion.slot import AdapterSlot

CASES = ["arch-gpt2", "arch-llama", "arch-t5", "arch-vit"]
TOLERANCE = 1e-5


def _case(case: str) -> dict:
    if not (BREADTH / case).is_dir():
        pytest.skip(f"AdapterHub breadth fixtures not found at {BREADTH}")
    return json.loads((BREADTH / case / "expected.json").read_text())


pytestmark = pytest.mark.xdist_group("architectures")  # one worker: the module-scoped runs are made once


@pytest.fixture(scope="module", params=CASES)
def imported(request, tmp_path_factory):
    """Every adapter, head and fusion of one fixture case imported into a fresh library."""
    case = request.param
    expected = _case(case)
    library = tmp_path_factory.mktemp(case) / "library"
    backbone = str(BREADTH / case / "backbone")
    folders = [
        *expected["adapters"],
        *(["task0_causal_lm_head"] if (BREADTH / case / "task0_causal_lm_head").is_dir() else []),
    ]
    for folder in [*folders, "fusion_task0_task1"]:
        import_adapterhub(BREADTH / case / folder, library, backbone, None, log=lambda _: None)
    opened = LibraryModel.open(library, backbone)
    opened.model.eval()
    return case, expected, opened


def _logits(opened: LibraryModel, expected: dict) -> torch.Tensor:
    with torch.no_grad():
        return opened.model(**{k: torch.tensor(v) for k, v in expected["inputs"].items()})


def test_imported_adapters_and_heads_reproduce_adapterhub(imported):
    _, expected, opened = imported
    for name, adapter in expected["adapters"].items():
        opened.load_adapter(name)
        for head, reference in adapter["heads"].items():
            opened.load_head(head)
            opened.model.activate([name], head=head)
            error = (_logits(opened, expected) - torch.tensor(reference["logits"])).abs().max().item()
            assert error < TOLERANCE, (name, head, error)


def test_bare_backbone_reproduces_adapterhub(imported):
    _, expected, opened = imported
    opened.load_adapter("task0")
    opened.load_head(expected["bare"]["head"])
    opened.model.activate([], head=expected["bare"]["head"])
    error = (_logits(opened, expected) - torch.tensor(expected["bare"]["logits"])).abs().max().item()
    assert error < TOLERANCE, error
    opened.model.activate(["task0"], head=expected["bare"]["head"])  # and the adapter matters
    assert (_logits(opened, expected) - torch.tensor(expected["bare"]["logits"])).abs().max() > 0.01


def test_imported_fusion_reproduces_adapterhub(imported):
    _, expected, opened = imported
    [(name, reference)] = expected["fusions"].items()
    opened.load_fusion(name)
    opened.load_head(name)
    opened.model.activate(fusion=name, head=name)
    error = (_logits(opened, expected) - torch.tensor(reference["logits"])).abs().max().item()
    assert error < TOLERANCE, error


def test_export_round_trips_bit_exactly(imported, tmp_path):
    case, expected, opened = imported
    for name, folder, files in [
        *((n, n, ("adapter.safetensors", "model_head.safetensors")) for n in expected["adapters"]),
        ("task0,task1", "fusion_task0_task1", ("model_adapter_fusion.safetensors", "model_head.safetensors")),
        *((n, f"{n}_head", ("model_head.safetensors",)) for n in ["task0_causal_lm"] if case != "arch-t5"),
    ]:
        if not (BREADTH / case / folder).is_dir():  # ViT has no causal LM head
            continue
        out = export_adapterhub(opened.library.root, name, tmp_path / folder, str(BREADTH / case / "backbone"))
        for filename in files:
            ours, theirs = load_file(str(out / filename)), load_file(str(BREADTH / case / folder / filename))
            theirs = {k: v for k, v in theirs.items() if not k.startswith("heads.") or k.startswith(f"heads.{name}.")}
            assert set(ours) == set(theirs), (folder, filename)
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), (folder, filename)
        config = "head_config.json" if folder.endswith("_head") else "adapter_config.json"
        config = "adapter_fusion_config.json" if folder.startswith("fusion") else config
        assert json.loads((out / config).read_text())["model_type"] == expected["backbone_config"]["model_type"]


# ---- invariants on tiny random configs of every new architecture --------------------------------------------


def _vit_batch() -> dict:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


BATCHES = {**{t: tiny_batch for t in TINY_BEYOND_BERT}, "vit": _vit_batch}


@pytest.mark.parametrize("model_type", sorted(BATCHES))
def test_new_adapter_is_identity_on_every_site(model_type):
    batch = BATCHES[model_type]()
    model = AdaptedModel(tiny_backbone(model_type))
    model.add_adapter("a", AdapterConfig(placement="houlsby", reduction_factor=4))
    model.activate(["a"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode(**batch), bare_hidden(tiny_backbone(model_type), batch), rtol=0, atol=1e-6
        )
    slots = [slot for _, location, slot in model.slots() if location in ("attention", "output")]
    assert slots and all(isinstance(s, AdapterSlot) and "a" in s.adapters for s in slots)


def test_t5_has_decoder_slots_and_they_act_on_the_decoder():
    model = AdaptedModel(tiny_backbone("t5"))
    assert model.num_layers == 4  # 2 encoder + 2 decoder blocks
    model.add_adapter("a", AdapterConfig(reduction_factor=4))
    randomize(model)
    batch = {**tiny_batch(), "decoder_input_ids": torch.tensor([[0, 5, 6]] * 3)}
    model.eval()
    with torch.no_grad():
        bare = model.encode(**batch)
        for index, _, slot in model.slots():
            slot.active = ("a",) if index >= 2 and "a" in slot.adapters else ()  # decoder slots only
        assert not torch.allclose(model.encode(**batch), bare, atol=1e-3)


@pytest.mark.parametrize("model_type", sorted(BATCHES))
def test_only_adapter_and_head_params_get_gradients(model_type):
    torch.manual_seed(0)
    batch = BATCHES[model_type]()
    model = AdaptedModel(tiny_backbone(model_type))
    model.add_adapter("a", AdapterConfig(placement="houlsby", reduction_factor=4))
    model.add_head("a", 3)
    randomize(model, std=0.1)
    model.set_trainable(adapters=["a"], heads=["a"])
    model.activate(["a"], head="a")
    model(**batch).pow(2).sum().backward()
    for name, param in model.named_parameters():
        if ".decoder." in name and model.sites.features:  # T5 classifies with its encoder: decoder adapters idle
            assert param.grad is None, name
        elif ".adapters.a." in name or name.startswith("heads.a."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


@pytest.mark.parametrize("model_type", sorted(BATCHES))
def test_fast_fusion_equals_naive_loop_in_float64(model_type, monkeypatch):
    from test_attention import assert_fast_equals_naive, trainable_fusion

    def build():
        model = AdaptedModel(tiny_backbone(model_type))
        for name in ("s0", "s1", "s2"):
            model.add_adapter(name, AdapterConfig(placement="houlsby", reduction_factor=4))
        model.add_fusion("f", ["s0", "s1", "s2"], FusionConfig(temperature=True))
        model.add_head("f", 3)
        model.set_fusion_temperature(3.0)
        return trainable_fusion(model)

    batch = {k: v.double() if v.is_floating_point() else v for k, v in BATCHES[model_type]().items()}
    assert_fast_equals_naive(build, batch, monkeypatch)


def test_decoder_classification_pools_the_last_real_token_with_either_padding_side():
    model = AdaptedModel(tiny_backbone("gpt2"))
    model.add_head("h", 3)
    randomize(model.heads)
    model.activate(head="h")
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        alone = model(ids, torch.ones_like(ids))
        right = model(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    assert model.heads["h"].pooling == "last"


# ---- the whole CLI on tiny GPT-2, Llama and T5 ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["gpt2", "llama", "t5"])
def cli_runs(request, tmp_path_factory):
    """``run`` (3 smoke tasks) then ``fuse`` on configs/backbone/tiny-<arch>.yaml, through the CLI."""
    import yaml

    from adafuse.continual.cli import main

    arch, tmp = request.param, tmp_path_factory.mktemp(request.param)
    backbone = yaml.safe_load((ROOT / "configs" / "backbone" / f"tiny-{arch}.yaml").read_text())
    configs = {}
    for kind in ("sequence", "fusion"):
        config = yaml.safe_load((ROOT / "configs" / kind / "smoke.yaml").read_text())
        config["backbone"] = backbone
        configs[kind] = tmp / f"{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump(config))
    library = tmp / "seq" / "library"
    assert main(["run", str(configs["sequence"]), "--out", str(tmp / "seq"), "--trainer.limit_train_batches", "4"]) == 0
    assert main(["fuse", str(configs["fusion"]), "--library", str(library), "--out", str(tmp / "fuse")]) == 0
    return arch, tmp, library


def test_cli_sequence_measures_bwt_zero_and_fusion_keeps_sources(cli_runs):
    _, tmp, _ = cli_runs
    run = json.loads((tmp / "seq" / "metrics.json").read_text())
    assert run["bwt"] == 0.0 and run["forgetting"] == 0.0
    assert all(v is not None for v in run["accuracy_matrix"][-1])
    fusion = json.loads((tmp / "fuse" / "metrics.json").read_text())
    assert fusion["source_accuracy_before"] == fusion["source_accuracy_after"]
    assert 0.0 <= fusion["test"]["accuracy"] <= 1.0


def test_cli_predict_routes_mixed_tasks_and_report_renders(cli_runs):
    from adafuse.continual.cli import main

    _, tmp, library = cli_runs
    rows = [
        ("bbc-business", "Shares rose"),
        ("bbc-topic5-fewshot-fusion", "The striker scored"),
        ("bbc-tech", "A chip"),
    ]
    (tmp / "mixed.csv").write_text("task,text\n" + "".join(f"{t},{x}\n" for t, x in rows))
    args = ["predict", "--library", str(library), "--task-column", "task", "--input", str(tmp / "mixed.csv")]
    assert main([*args, "--out", str(tmp / "mixed.jsonl")]) == 0
    mixed = [json.loads(line) for line in (tmp / "mixed.jsonl").read_text().splitlines()]
    assert [r["task"] for r in mixed] == [t for t, _ in rows]
    for (task, text), row in zip(rows, mixed, strict=True):  # one pass per task gives the same probabilities
        (tmp / "one.txt").write_text(text + "\n")
        which = "--fusion" if task.endswith("fusion") else "--adapter"
        one = ["predict", "--library", str(library), which, task, "--input", str(tmp / "one.txt")]
        assert main([*one, "--out", str(tmp / f"{task}.jsonl")]) == 0
        alone = json.loads((tmp / f"{task}.jsonl").read_text())
        assert row["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)
    assert main(["report", str(tmp / "seq"), str(tmp / "fuse"), "--out", str(tmp)]) == 0
    assert (tmp / "comparison.md").is_file()


def test_cli_export_import_round_trips(cli_runs, capsys):
    from adafuse.continual.cli import main

    arch, tmp, library = cli_runs
    args = ["library", "export", "bbc-business", "--library", str(library), "--out", str(tmp / "ah")]
    assert main(args) == 0
    if arch == "t5":  # AdapterHub's T5 classification reads decoder eos tokens; adafuse's reads the encoder
        assert "head 'bbc-business' not exported: it pools by 'mean'" in capsys.readouterr().err
        assert not (tmp / "ah" / "head_config.json").exists()
    again = tmp / "again"
    import_args = ["library", "import", str(tmp / "ah"), "--library", str(again), "--name", "copy"]
    assert main(import_args) == 2  # a new library defaults to the embedded MiniLM: refused, naming both
    assert f"saved for a {arch} model" in capsys.readouterr().err and not again.exists()
    backbone = str(ROOT / "configs" / "backbone" / f"tiny-{arch}.yaml")
    assert main([*import_args, "--backbone", backbone]) == 0
    ours, theirs = LibraryModel.open(library), LibraryModel.open(again)
    ours.load_adapter("bbc-business"), theirs.load_adapter("copy")
    a, b = ours.model.adapter_state("bbc-business"), theirs.model.adapter_state("copy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- loading: local folders stand for Hub names; bad input ---------------------------------------------------


def _word_tokenizer(folder, pad: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(98)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<unk>"} if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", **extra).save_pretrained(
        folder
    )


def test_a_local_decoder_folder_loads_like_a_hub_name_and_pads_with_eos(tmp_path):
    from adafuse.fusion.backbone import BackboneConfig, load_model, load_tokenizer

    folder = tmp_path / "my-gpt2"
    tiny_backbone("gpt2").save_pretrained(folder)
    _word_tokenizer(folder, pad=False)  # like GPT-2's own tokenizer: no pad token
    config = BackboneConfig(name=str(folder))
    tokenizer, model = load_tokenizer(config), AdaptedModel(load_model(config))
    assert tokenizer.pad_token == "<eos>" and tokenizer.padding_side == "right"
    batch = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    model.add_head("h", 2)
    model.activate(head="h")
    model.eval()
    with torch.no_grad():
        both = model(**batch)
        alone = model(**tokenizer(["w4"], return_tensors="pt"))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)  # the padded row pools its own last token


def test_max_length_beyond_the_positions_is_refused_before_writing(tmp_path, capsys):
    import yaml

    from adafuse.continual.cli import main

    config = yaml.safe_load((ROOT / "configs" / "sequence" / "smoke.yaml").read_text())
    config["backbone"] = yaml.safe_load((ROOT / "configs" / "backbone" / "tiny-gpt2.yaml").read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--max_length", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_length: 256 tokens exceed the backbone's 128 positions (n_positions" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import BloomConfig, BloomModel

    from adafuse.fusion.errors import UserError

    with pytest.raises(UserError, match="'bloom' is not supported; expected one of .*gpt2.*llama.*t5.*vit"):
        AdaptedModel(BloomModel(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)))


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "backbone").glob("*.yaml")))
def test_every_backbone_config_builds_an_adapted_model(name):
    from adafuse.continual.config import load_config
    from adafuse.fusion.backbone import BackboneConfig, load_model

    model = AdaptedModel(load_model(load_config(BackboneConfig, ROOT / "configs" / "backbone" / f"{name}.yaml")))
    assert model.num_layers >= 2 and all(not p.requires_grad for p in model.parameters())
