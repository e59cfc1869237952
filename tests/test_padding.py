"""``trainer.pad_to_multiple_of``: batches padded to a few static lengths, invisible to every metric."""

from pathlib import Path

import pytest
import torch
from conftest import TINY, randomize

from adafuse.continual.cli import main
from adafuse.continual.training.evaluate import evaluate, predict_logits
from adafuse.fusion.backbone import BackboneConfig, load_model, load_tokenizer
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel
from adafuse.tasks.datamodule import TaskDataModule
from adafuse.tasks.spec import SplitData, TaskData
from adafuse.tasks.types import TASK_TYPES

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while seven quick dogs ran far away".split()


def _texts(n: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=generator).tolist()
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(length)) for i, length in enumerate(lengths)]


def _classification() -> TaskData:
    splits = {
        split: SplitData(texts=_texts(40, seed), labels=[i % 3 for i in range(40)])
        for seed, split in enumerate(("train", "validation", "test"))
    }
    return TaskData("lengths", ["a", "b", "c"], splits, max_length=48)


def _tagging() -> TaskData:
    def split(seed):
        texts = [t.split() for t in _texts(30, seed)]
        return SplitData(texts=texts, labels=[[(i + j) % 3 for j in range(len(t))] for i, t in enumerate(texts)])

    return TaskData("tags", ["O", "B-X", "I-X"], {s: split(k) for k, s in enumerate(("train", "validation", "test"))},
                    max_length=48, type="tagging")  # fmt: skip


@pytest.fixture(scope="module")
def model():
    spec = {**TINY["bert"], "model_type": "bert", "vocab_size": 30522}  # the embedded tokenizer's ids
    adapted = AdaptedModel(load_model(BackboneConfig(random_init=spec)))
    adapted.add_adapter("a", AdapterConfig(reduction_factor=4))
    randomize(adapted, seed=1, std=0.05)  # the adapter's up-projection leaves zero: it changes the outputs
    adapted.add_head("cls", num_labels=3)
    adapted.add_head("tags", num_labels=3, head_type=TASK_TYPES["tagging"].head_for(adapted.sites))
    return adapted


@pytest.mark.parametrize("kind", ["classification", "tagging"])
def test_padding_to_a_multiple_changes_shapes_but_no_output(model, kind):
    task = _classification() if kind == "classification" else _tagging()
    tokenizer = load_tokenizer(BackboneConfig())
    model.activate(["a"], head="cls" if kind == "classification" else "tags")
    gather = TASK_TYPES[kind].gather
    plain = TaskDataModule(task, tokenizer, eval_batch_size=8).eval_dataloader("test")
    padded = TaskDataModule(task, tokenizer, eval_batch_size=8, pad_to_multiple_of=16).eval_dataloader("test")
    lengths = {batch["input_ids"].shape[1] for batch in padded}
    assert all(length % 16 == 0 for length in lengths) and len(lengths) <= 3
    assert any(batch["input_ids"].shape[1] % 16 for batch in plain)  # without it, the lengths vary
    logits, labels = predict_logits(model, plain, gather=gather)
    padded_logits, padded_labels = predict_logits(model, padded, gather=gather)
    assert torch.equal(labels, padded_labels)
    torch.testing.assert_close(padded_logits, logits, rtol=0, atol=1e-5)
    scores = [evaluate(model, loader, task_type=kind, label_names=task.label_names) for loader in (padded, plain)]
    assert scores[0] == scores[1]


def test_a_run_with_padding_records_it_and_a_generation_task_refuses_it(tmp_path, capsys):
    out = tmp_path / "padded"
    smoke = str(ROOT / "configs" / "sequence" / "smoke.yaml")
    args = ["run", smoke, "--out", str(out), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    assert main([*args, "--trainer.pad_to_multiple_of", "16"]) == 0
    assert "pad_to_multiple_of: 16" in (out / "config.yaml").read_text()
    capsys.readouterr()
    mixed = ["run", str(ROOT / "configs" / "sequence" / "mixed-types.yaml"), "--out", str(tmp_path / "mixed")]
    assert main([*mixed, "--trainer.pad_to_multiple_of", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'synthetic-who-lives-where' is a generation task" in err[0], err
    assert not (tmp_path / "mixed").exists()
