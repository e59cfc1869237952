"""Adapter kinds: bottleneck, parallel, Compacter and LoRA behind one protocol; AdapterHub parity for each."""

import json
import shutil

import pytest
import torch
from conftest import BREADTH, randomize, tiny_backbone, tiny_batch
from safetensors.torch import load_file

from adafuse.continual.jobs.interop import export_adapterhub, import_adapterhub
from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.errors import UserError
from adafuse.fusion.formats.adapterhub_read import load_tensors
from adafuse.fusion.kinds import KINDS, AdapterConfig, BottleneckAdapter
from adafuse.fusion.model import AdaptedModel


def test_new_adapter_delta_is_exactly_zero():
    adapter = BottleneckAdapter(16, AdapterConfig(reduction_factor=4), {})
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x), torch.zeros_like(x))
    assert adapter.down.weight.abs().sum() > 0  # the down-projection is not degenerate


def test_bottleneck_size_from_reduction_factor_or_explicit():
    assert AdapterConfig(reduction_factor=16).size(384) == 24
    assert AdapterConfig(bottleneck=7).size(384) == 7
    assert AdapterConfig(reduction_factor=1000).size(16) == 1


@pytest.mark.parametrize("name", ["relu", "gelu", "swish", "tanh"])
def test_non_linearities(name):
    adapter = BottleneckAdapter(8, AdapterConfig(reduction_factor=2, non_linearity=name), {})
    torch.nn.init.normal_(adapter.up.weight)
    out = adapter(torch.randn(1, 3, 8))
    assert out.shape == (1, 3, 8) and out.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs", [{"placement": "sideways"}, {"non_linearity": "cubic"}, {"reduction_factor": 0}, {"bottleneck": 0}]
)
def test_bad_config_refused(kwargs):
    with pytest.raises(UserError):
        AdapterConfig(**kwargs)


def test_placements():
    assert AdapterConfig(placement="pfeiffer").locations == ("output",)
    assert AdapterConfig(placement="houlsby").locations == ("attention", "output")
    assert AdapterConfig(placement="pfeiffer").input_is_normed
    assert not AdapterConfig(placement="houlsby").input_is_normed


# ---- every kind: AdapterHub parity, the invariants, a sequence with BWT = 0 -------------------------------------

KINDS_CASE = BREADTH / "kinds-bert"
IMPORTABLE = ["lora", "parallel", "compacter", "prefix"]
KIND_CONFIGS = {
    "bottleneck": AdapterConfig(reduction_factor=4),
    "parallel": AdapterConfig(kind="parallel", reduction_factor=4),
    "compacter": AdapterConfig(kind="compacter", placement="houlsby", reduction_factor=4, non_linearity="gelu"),
    "lora": AdapterConfig(kind="lora", r=4, alpha=8, target_modules=["q", "v", "ffn_out"]),
    "prefix": AdapterConfig(kind="prefix", prefix_length=3, bottleneck=8),
}


@pytest.fixture(scope="module")
def kinds_library(tmp_path_factory):
    if not KINDS_CASE.is_dir():
        pytest.skip(f"AdapterHub breadth fixtures not found at {KINDS_CASE}")
    library = tmp_path_factory.mktemp("kinds") / "library"
    for name in IMPORTABLE:
        import_adapterhub(KINDS_CASE / name, library, str(KINDS_CASE / "backbone"), None, log=lambda _: None)
    opened = LibraryModel.open(library, str(KINDS_CASE / "backbone"))
    opened.model.eval()
    return opened, json.loads((KINDS_CASE / "expected.json").read_text())


@pytest.mark.parametrize("name", IMPORTABLE)
def test_imported_kind_reproduces_adapterhub(kinds_library, name):
    opened, expected = kinds_library
    opened.load_adapter(name)
    opened.load_head(name)
    opened.model.activate([name], head=name)
    with torch.no_grad():
        logits = opened.model(**{k: torch.tensor(v) for k, v in expected["inputs"].items()})
    error = (logits - torch.tensor(expected["adapters"][name]["heads"][name]["logits"])).abs().max().item()
    assert error < 1e-5, error
    assert opened.library.get("adapter", name)["config"]["adapter"]["kind"] == name


@pytest.mark.parametrize("name", IMPORTABLE)
def test_kind_export_round_trips_bit_exactly(kinds_library, name, tmp_path):
    opened, _ = kinds_library
    out = export_adapterhub(opened.library.root, name, tmp_path / name, str(KINDS_CASE / "backbone"))
    ours, theirs = load_file(str(out / "adapter.safetensors")), load_tensors(KINDS_CASE / name, "adapter")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((out / "adapter_config.json").read_text())["config"]
    reference = json.loads((KINDS_CASE / name / "adapter_config.json").read_text())["config"]
    assert {k: v for k, v in config.items() if k in reference} == {k: v for k, v in reference.items() if k in config}


def test_flat_prefix_tuning_import_is_refused_with_one_line(tmp_path):
    if not KINDS_CASE.is_dir():
        pytest.skip("fixtures missing")
    shutil.copytree(KINDS_CASE / "prefix", tmp_path / "flat")
    meta = json.loads((tmp_path / "flat" / "adapter_config.json").read_text())
    meta["config"]["flat"] = True
    (tmp_path / "flat" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="AdapterHub option flat=True is not supported"):
        import_adapterhub(tmp_path / "flat", tmp_path / "lib", str(KINDS_CASE / "backbone"), None)
    assert not (tmp_path / "lib" / "manifest.json").exists()


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_each_kind_is_identity_at_init_where_defined_and_only_its_params_train(kind, model_type):
    if (kind, model_type) == ("prefix", "llama"):
        pytest.skip("BERT family only: test_prefix_is_refused_where_attention_takes_no_prefix")
    torch.manual_seed(0)
    batch = tiny_batch()
    model = AdaptedModel(tiny_backbone(model_type))
    model.eval()
    with torch.no_grad():
        bare = model.encode(**batch)
    model.add_adapter("a", KIND_CONFIGS[kind])
    model.add_head("a", 2)
    model.activate(["a"], head="a")
    with torch.no_grad():
        adapted = model.encode(**batch)
    if KINDS[kind].identity_at_init:
        torch.testing.assert_close(adapted, bare, rtol=0, atol=1e-6)
    else:  # prefix tuning: the prefixes are attended to from the start
        assert (adapted - bare).abs().max() > 1e-3
    model.set_trainable(adapters=["a"], heads=["a"])
    model(**batch).pow(2).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters.a." in n or n.startswith("heads.a.") for n in grads)
    learns = ("up", "lora_B", "control_trans.2")  # the factor that starts at zero, or the prefixes' last layer
    assert any(".adapters.a." in n and any(part in n for part in learns) for n in grads)


@pytest.mark.parametrize(("kind", "shared"), [("compacter", "down.phm_rule"), ("prefix", "wte.weight")])
def test_shared_parameters_are_one_and_round_trip_exactly(kind, shared):
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("c", KIND_CONFIGS[kind])
    modules = [slot.adapters["c"] for _, _, slot in model.slots() if "c" in slot.adapters]
    assert len(modules) > 1
    assert len({id(m.get_parameter(shared)) for m in modules}) == 1  # one Parameter for every site of the adapter
    randomize(model)
    state = model.adapter_state("c")
    again = AdaptedModel(tiny_backbone("bert"))
    again.add_adapter("c", KIND_CONFIGS[kind])
    again.load_adapter_state("c", state)
    assert all(torch.equal(v, again.adapter_state("c")[k]) for k, v in state.items())


def test_prefix_is_refused_where_attention_takes_no_prefix():
    model = AdaptedModel(tiny_backbone("llama"))
    with pytest.raises(UserError, match=r"llama backbone has no self-attention site \(prefix tuning\) \['prefix'\]"):
        model.add_adapter("p", KIND_CONFIGS["prefix"])
    assert "p" not in model.adapter_configs


def test_prefix_folds_for_inference_and_unfolds_after_a_step():
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("p", AdapterConfig(kind="prefix", prefix_length=3, bottleneck=8, dropout=0.5))
    prefix = next(slot.adapters["p"] for _, _, slot in model.slots() if "p" in slot.adapters)
    model.eval()
    with torch.no_grad():
        folded = prefix()
        assert prefix() is folded  # computed once, reused by every forward pass
    with torch.inference_mode():
        assert prefix() is folded
    assert folded.shape == (2, 3, model.hidden_size)  # keys and values, P positions
    model.set_trainable(adapters=["p"])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    trained = prefix()
    assert trained.requires_grad and not torch.equal(trained, folded)  # dropout runs in training
    trained.sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(prefix(), folded)  # the step changed the weights: folded anew


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_routed_rows_see_only_their_own_prefix(implementation):
    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone("bert"))
    model.backbone.set_attn_implementation(implementation)
    for name in ("p", "q"):
        model.add_adapter(name, AdapterConfig(kind="prefix", prefix_length=2 + len(name), bottleneck=8))
    model.add_adapter("b", AdapterConfig(reduction_factor=4))
    randomize(model)
    model.eval()
    batch = tiny_batch(batch=4)
    expected = torch.empty(4, 7, model.hidden_size)
    with torch.no_grad():
        for name, rows in (("p", [0, 3]), ("q", [1]), ("b", [2])):
            model.activate([name])
            expected[rows] = model.encode(**batch)[rows]
        model.route({"p": torch.tensor([0, 3]), "q": torch.tensor([1]), "b": torch.tensor([2])})
        routed = model.encode(**batch)
    torch.testing.assert_close(routed, expected, rtol=0, atol=1e-5)


def test_prefixes_are_neither_fused_nor_merged():
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("p", KIND_CONFIGS["prefix"])
    with pytest.raises(UserError, match="cannot be composed by attention"):
        model.add_fusion("f", ["p"], FusionConfig())
    with pytest.raises(UserError, match="cannot be composed by weighted"):
        model.add_fusion("f", ["p"], FusionConfig(composition="weighted"))
    with pytest.raises(UserError, match=r"'p' \(prefix\) cannot be merged"):
        model.merge_adapter("p")


def test_lora_on_gpt2_names_what_the_architecture_has():
    model = AdaptedModel(tiny_backbone("gpt2"))
    with pytest.raises(UserError, match="gpt2 backbone has no projections"):
        model.add_adapter("l", KIND_CONFIGS["lora"])


def test_fusion_refuses_lora_sources_and_mixes_slot_kinds(monkeypatch):
    from test_attention import assert_fast_equals_naive, trainable_fusion

    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("l", KIND_CONFIGS["lora"])
    with pytest.raises(UserError, match="cannot be composed by attention"):
        model.add_fusion("f", ["l"], FusionConfig())

    def build():
        model = AdaptedModel(tiny_backbone("bert"))
        houlsby = {"placement": "houlsby", "reduction_factor": 4, "non_linearity": "gelu"}
        model.add_adapter("b", AdapterConfig(**houlsby))
        model.add_adapter("c", AdapterConfig(kind="compacter", **houlsby))
        model.add_adapter("b2", AdapterConfig(scaling=2.5, **houlsby))
        model.add_fusion("f", ["b", "c", "b2"], FusionConfig())
        model.add_head("f", 3)
        return trainable_fusion(model)

    assert_fast_equals_naive(build, tiny_batch(), monkeypatch)


def test_parallel_fusion_fast_path_equals_naive(monkeypatch):
    from test_attention import assert_fast_equals_naive, trainable_fusion

    def build():
        model = AdaptedModel(tiny_backbone("llama"))
        for name in ("p0", "p1"):
            model.add_adapter(name, AdapterConfig(kind="parallel", reduction_factor=4))
        model.add_fusion("f", ["p0", "p1"], FusionConfig())
        model.add_head("f", 3)
        return trainable_fusion(model)

    assert_fast_equals_naive(build, tiny_batch(), monkeypatch)


@pytest.mark.parametrize("kind", ["parallel", "compacter", "lora", "prefix"])
def test_a_sequence_of_each_kind_measures_bwt_zero(kind, tmp_path):
    from conftest import ROOT

    from adafuse.continual.cli import main

    out = tmp_path / "run"
    args = ["run", str(ROOT / "configs" / "sequence" / "smoke.yaml"), "--out", str(out), "--adapter.kind", kind]
    extra = ["--adapter.placement", "houlsby", "--adapter.non_linearity", "gelu"] if kind == "compacter" else []
    assert main([*args, *extra, "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bwt"] == 0.0 and metrics["adapter_kind"] == kind
    params = {t["trainable_params"] for t in metrics["per_task"].values()}
    assert len(params) == 1 and params.pop() > 0
    assert f"adapter kind `{kind}`" in (out / "report.md").read_text()
    library = LibraryModel.open(out / "library")
    assert {e["config"]["adapter"]["kind"] for e in library.library.entries("adapter")} == {kind}


def test_merged_lora_gives_the_adapter_outputs():
    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone("llama"))
    model.add_adapter("l", KIND_CONFIGS["lora"])
    model.add_head("l", 3)
    randomize(model.heads)
    for _, _, slot in model.slots():
        if "l" in slot.adapters:
            torch.nn.init.normal_(slot.adapters["l"].lora_B, std=0.1)
    model.eval()
    model.activate(["l"], head="l")
    with torch.no_grad():
        adapted = model(**tiny_batch())
        model.merge_adapter("l")
        model.activate(head="l")
        merged = model(**tiny_batch())
    assert (adapted - merged).abs().max() < 1e-5 and "l" in model.merged and "l" not in model.adapter_configs
    model.add_adapter("b", KIND_CONFIGS["bottleneck"])
    with pytest.raises(UserError, match="only weight deltas"):
        model.merge_adapter("b")


def test_predict_merge_through_the_cli(tmp_path):
    import yaml
    from conftest import ROOT

    from adafuse.continual.cli import main

    config = yaml.safe_load((ROOT / "configs" / "sequence" / "smoke.yaml").read_text())
    config |= {"tasks": ["bbc-business"], "adapter": {"kind": "lora", "r": 4, "alpha": 16}}
    config["trainer"] |= {"max_epochs": 1, "limit_train_batches": 4, "lr": 0.05}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "lora.yaml"), "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "in.txt").write_text("Shares rose sharply.\nThe striker scored twice in the final.\n")
    base = ["predict", "--library", str(tmp_path / "run" / "library"), "--adapter", "bbc-business"]
    base += ["--input", str(tmp_path / "in.txt")]
    assert main([*base, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main([*base, "--out", str(tmp_path / "m.jsonl"), "--merge"]) == 0
    adapted, merged = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "m.jsonl"))
    for a, m in zip(adapted, merged, strict=True):
        assert m["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)


def _lora_sources(model: AdaptedModel, names=("l0", "l1", "l2")) -> list[str]:
    for name in names:
        model.add_adapter(name, KIND_CONFIGS["lora"])
    with torch.no_grad():  # trained-looking sources (B is zero at init)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return list(names)


def test_weighted_composition_is_inert_at_init_and_learns_only_its_weights():
    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone("bert"))
    sources = _lora_sources(model)
    model.add_fusion("w", sources, FusionConfig(composition="weighted"))
    model.add_head("w", 3)
    model.eval()
    batch = tiny_batch()
    model.activate(head="w")
    with torch.no_grad():
        bare = model(**batch)
    model.activate(fusion="w", head="w")
    with torch.no_grad():
        assert torch.equal(model(**batch), bare)  # all weights 0: exactly the bare backbone
    weights = {id(s.fusions["w"].weights) for _, _, s in model.slots() if "w" in s.fusions}
    assert len(weights) == 1  # one weight vector shared by every projection
    model.set_trainable(fusions=["w"], heads=["w"])
    (model(**batch).pow(2).sum() + model.fusion_regularization()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith("fusions.w.weights") for n in grads)
    assert all(".fusions.w." in n or n.startswith("heads.w.") for n in grads)
    with torch.no_grad():  # a weighted sum of the sources' deltas, nothing else
        slot = next(s for _, _, s in model.slots() if "w" in s.fusions)
        slot.fusions["w"].weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.activate(["l0"], head="w")
        x = torch.randn(2, 3, slot.in_features)
        expected = sum(w * slot.adapters[s](x) for w, s in zip([0.5, -1.0, 2.0], sources, strict=True))
        torch.testing.assert_close(slot.fusions["w"](x, [slot.adapters[s] for s in sources]), expected)


def test_weighted_composition_refuses_slot_kinds_and_round_trips():
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("b", KIND_CONFIGS["bottleneck"])
    with pytest.raises(UserError, match="cannot be composed by weighted"):
        model.add_fusion("w", ["b"], FusionConfig(composition="weighted"))
    sources = _lora_sources(model)
    model.add_fusion("w", sources, FusionConfig(composition="weighted"))
    randomize(model, std=0.3)
    state = model.fusion_state("w")
    again = AdaptedModel(tiny_backbone("bert"))
    _lora_sources(again)
    again.add_fusion("w", sources, FusionConfig(composition="weighted"))
    again.load_fusion_state("w", state)
    assert all(torch.equal(v, again.fusion_state("w")[k]) for k, v in state.items())


def test_fuse_composition_weighted_through_the_cli(tmp_path):
    import yaml
    from conftest import ROOT

    from adafuse.continual.cli import main

    config = yaml.safe_load((ROOT / "configs" / "sequence" / "smoke.yaml").read_text())
    config |= {"adapter": {"kind": "lora", "r": 4, "alpha": 8}}
    config["trainer"] |= {"max_epochs": 1, "limit_train_batches": 4}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "lora.yaml"), "--out", str(tmp_path / "run")]) == 0
    library = str(tmp_path / "run" / "library")
    fuse = ["fuse", str(ROOT / "configs" / "fusion" / "smoke.yaml"), "--library", library, "--out", str(tmp_path / "w")]
    assert main([*fuse, "--composition", "weighted"]) == 0
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert set(metrics["composition_weights"]) == {"bbc-business", "bbc-sports", "bbc-tech"}
    assert any(w != 0.0 for w in metrics["composition_weights"].values())  # learned by gradient
    assert metrics["source_accuracy_before"] == metrics["source_accuracy_after"]
    assert "Composition weights" in (tmp_path / "w" / "report.md").read_text()
    opened = LibraryModel.open(library)
    assert opened.load_fusion("bbc-topic5-fewshot-fusion") == ["bbc-business", "bbc-sports", "bbc-tech"]


def test_gradient_free_search_never_ends_worse_than_it_started():
    from adafuse.continual.training.search import search_weights

    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone("bert"))
    sources = _lora_sources(model)
    model.add_fusion("w", sources, FusionConfig(composition="weighted", l1=0.0))
    model.add_head("w", 2)
    batches = [{**tiny_batch(seed=s), "labels": torch.tensor([0, 1, 1])} for s in range(3)]
    scores = []
    found = search_weights(model, "w", "w", batches, iterations=4, population=4, log=scores.append)
    slot = next(s for _, _, s in model.slots() if "w" in s.fusions)
    assert slot.fusions["w"].weights.tolist() == found and len(found) == 3
    best = [float(line.split("best score ")[1].split(",")[0]) for line in scores]
    assert best == sorted(best, reverse=True)  # the best score only ever improves


def test_fuse_weighted_by_search_keeps_the_searched_weights(tmp_path):
    import yaml
    from conftest import ROOT

    from adafuse.continual.cli import main

    config = yaml.safe_load((ROOT / "configs" / "sequence" / "smoke.yaml").read_text())
    config |= {"tasks": ["bbc-business", "bbc-tech"], "adapter": {"kind": "lora", "r": 4, "alpha": 8}}
    config["trainer"] |= {"max_epochs": 1, "limit_train_batches": 2}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "lora.yaml"), "--out", str(tmp_path / "run")]) == 0
    fuse = ["fuse", str(ROOT / "configs" / "fusion" / "smoke.yaml"), "--library", str(tmp_path / "run" / "library")]
    args = [*fuse, "--out", str(tmp_path / "es"), "--composition", "weighted", "--fusion.search", "es"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "es" / "metrics.json").read_text())
    assert set(metrics["composition_weights"]) == {"bbc-business", "bbc-tech"}
    assert metrics["trainable_params"] == 32 * 32 + 32 + 32 * 5 + 5  # the head only: the weights stay as searched
