"""``adafuse predict``: single adapter, fusion, mixed-task rows in one pass, AdapterDrop, bad inputs."""

import json
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT

from adafuse.continual.cli import main
from adafuse.continual.config import load_config
from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.backbone import BackboneConfig, load_model
from adafuse.fusion.fingerprint import fingerprint
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import AdapterLibrary
from adafuse.fusion.model import AdaptedModel

TEXTS = [
    "Shares rose sharply after the bank's results.",
    "The striker scored twice in the final.",
    "A new phone with a faster chip.",
    "Parliament voted on the bill today.",
    "Markets fell.",
]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tiny-BERT library: adapters a (pfeiffer) and h (houlsby), fusion f over a and b, a head for each."""
    root = tmp_path_factory.mktemp("predict") / "library"
    config = load_config(BackboneConfig, ROOT / "configs" / "backbone" / "tiny-bert.yaml")
    backbone = load_model(config)
    fp, library, model = fingerprint(backbone), AdapterLibrary(root), AdaptedModel(backbone)
    record = {"fingerprint": fp, "backbone": asdict(config)}
    adapters = {"a": AdapterConfig(), "b": AdapterConfig(), "h": AdapterConfig(placement="houlsby")}
    for seed, (name, adapter) in enumerate(adapters.items()):
        model.add_adapter(name, adapter)
        library.add(
            "adapter", name, _random(model.adapter_state(name), seed), config={"adapter": asdict(adapter)}, **record
        )
    model.add_fusion("f", ["a", "b"], FusionConfig())
    fusion_config = {"fusion": asdict(FusionConfig())}
    sources = [{"name": e["name"], "sha256": e["sha256"]} for e in library.entries("adapter") if e["name"] in "ab"]
    library.add("fusion", "f", _random(model.fusion_state("f"), 7), config=fusion_config, sources=sources, **record)
    for seed, (name, labels) in enumerate({"a": 2, "b": 3, "h": 2, "f": 4}.items()):
        model.add_head(name, labels)
        head_config = {"num_labels": labels, "label_names": [f"{name}{i}" for i in range(labels)]}
        library.add("head", name, _random(model.head_state(name), 10 + seed), config=head_config, **record)
    return root


def _random(state, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def _predict(library, tmp_path, rows, *flags):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--library", str(library), "--input", str(source), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _probabilities(results):
    return torch.tensor([r["probabilities"] for r in results])


def test_single_adapter_output_schema(library, tmp_path):
    results = _predict(library, tmp_path, [{"text": t} for t in TEXTS], "--adapter", "a")
    assert len(results) == len(TEXTS)
    for result in results:
        assert set(result) == {"label", "label_name", "probabilities"}
        assert result["label_name"] == f"a{result['label']}" and abs(sum(result["probabilities"]) - 1) < 1e-5
        assert result["label"] == max(range(2), key=result["probabilities"].__getitem__)


def test_mixed_task_batch_equals_one_pass_per_task(library, tmp_path):
    tasks = ["a", "h", "f", "b", "a"]
    mixed = _predict(
        library, tmp_path, [{"text": t, "task": k} for t, k in zip(TEXTS, tasks, strict=True)], "--task-column", "task"
    )
    assert [r["task"] for r in mixed] == tasks
    for task in set(tasks):
        rows = [i for i, k in enumerate(tasks) if k == task]
        flag = "--fusion" if task == "f" else "--adapter"
        alone = _predict(library, tmp_path, [{"text": TEXTS[i]} for i in rows], flag, task)
        together = _probabilities([mixed[i] for i in rows])
        assert torch.allclose(together, _probabilities(alone), atol=1e-5), task


def test_bf16_autocast_predicts_within_its_rounding_of_float32(library, tmp_path, capsys):
    """``--precision bf16-mixed``: the same labels' probabilities within bf16 rounding, and not bit-identical
    (the forward really ran under autocast); refused in one line on a CPU without bf16 instructions."""
    from adafuse.fusion.widen import cpu_has_bf16

    rows = [{"text": t, "task": k} for t, k in zip(TEXTS, ["a", "h", "f", "b", "a"], strict=True)]
    exact = _predict(library, tmp_path, rows, "--task-column", "task")
    if not cpu_has_bf16():
        flags = ["--task-column", "task", "--precision", "bf16-mixed"]
        source, out = tmp_path / "in.jsonl", tmp_path / "bf16.jsonl"
        code = main(["predict", "--library", str(library), "--input", str(source), "--out", str(out), *flags])
        assert code == 2 and "needs a CPU with bf16 instructions" in capsys.readouterr().err and not out.exists()
        return
    narrow = _predict(library, tmp_path, rows, "--task-column", "task", "--precision", "bf16-mixed")
    pairs = zip(exact, narrow, strict=True)
    worst = max(abs(a - b) for x, y in pairs for a, b in zip(x["probabilities"], y["probabilities"], strict=True))
    assert 0 < worst < 0.05


def test_adapterdrop_all_layers_is_the_bare_backbone(library, tmp_path):
    dropped = _probabilities(
        _predict(library, tmp_path, [{"text": t} for t in TEXTS], "--adapter", "a", "--drop-layers", "2")
    )
    kept = _probabilities(_predict(library, tmp_path, [{"text": t} for t in TEXTS], "--adapter", "a"))
    opened = LibraryModel.open(library)
    opened.load_head("a")
    opened.model.eval()
    encoded = opened.tokenizer(TEXTS, truncation=True, max_length=128, padding=True, return_tensors="pt")
    opened.model.activate([], head="a")
    with torch.no_grad():
        bare = torch.softmax(opened.model(encoded["input_ids"], encoded["attention_mask"]), -1)
    assert torch.allclose(dropped, bare, atol=1e-5)
    assert not torch.allclose(kept, bare, atol=1e-3)  # the adapter matters, so dropping it is visible
    one = _probabilities(
        _predict(library, tmp_path, [{"text": t} for t in TEXTS], "--fusion", "f", "--drop-layers", "1")
    )
    assert one.shape == (len(TEXTS), 4)


def test_plain_text_and_csv_inputs(library, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n\n")
    (tmp_path / "in.csv").write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    out_txt, out_csv = tmp_path / "txt.jsonl", tmp_path / "csv.jsonl"
    base = ["predict", "--library", str(library), "--adapter", "b"]
    assert main([*base, "--input", str(tmp_path / "in.txt"), "--out", str(out_txt)]) == 0
    assert main([*base, "--input", str(tmp_path / "in.csv"), "--out", str(out_csv), "--text-column", "body"]) == 0
    assert out_txt.read_text() == out_csv.read_text() and len(out_txt.read_text().splitlines()) == len(TEXTS)


@pytest.mark.parametrize(
    "rows,flags,match",
    [
        ([{"text": "x", "task": "nope"}], ["--task-column", "task"], "row 1: task 'nope' is not an adapter"),
        ([{"body": "x"}], ["--adapter", "a"], "expected a string (or, for tagging, a list of words) in field 'text'"),
        ([{"text": "x"}], ["--adapter", "zzz"], "task 'zzz' is not an adapter"),
        ([{"text": "x"}], ["--adapter", "a", "--drop-layers", "9"], "--drop-layers 9: expected 0..2"),
        ([], ["--adapter", "a"], "no rows to predict"),
        ([{"text": "x"}], ["--adapter", "a", "--backbone", "embedded"], "belongs to backbone"),
        ([{"text": "x"}], ["--adapter", "a", "--precision", "64"], "--precision '64': expected one of 32, bf16-mixed"),
        ([{"text": "x"}], ["--adapter", "a", "--precision", "16-mixed"], "--precision 16-mixed needs a CUDA device"),
    ],
)
def test_bad_predict_input_writes_nothing(library, tmp_path, capsys, rows, flags, match):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    code = main(["predict", "--library", str(library), "--input", str(source), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fusion_with_changed_source_is_refused(library, tmp_path, capsys):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(library, copy)
    changed = AdapterLibrary(copy)
    entry = changed.get("adapter", "b")
    doubled = {k: v * 2 for k, v in changed.load("adapter", "b").tensors.items()}
    changed.add("adapter", "b", doubled, fingerprint=entry["fingerprint"], config=entry["config"])
    (tmp_path / "in.txt").write_text("hello\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            ["predict", "--library", str(copy), "--fusion", "f", "--input", str(tmp_path / "in.txt"), "--out", str(out)]
        )
        == 1
    )
    assert "source adapter 'b' is missing or changed" in capsys.readouterr().err and not out.exists()


def test_tampered_adapter_is_refused_at_load(library, tmp_path, capsys):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(library, copy)
    path = copy / "adapters" / "a.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "in.txt").write_text("hello\n")
    out = tmp_path / "out.jsonl"
    args = ["predict", "--library", str(copy), "--adapter", "a", "--input", str(tmp_path / "in.txt"), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256 does not match the manifest" in err[0] and not out.exists()
