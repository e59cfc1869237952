"""Continual-learning strategies (EWC, LwF, replay): the penalties and the memory as pure functions, and end to
end on a sequence built to forget: each strategy forgets less than naive fine-tuning, and resumes after kill -9."""

import json
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import forgetting_sequence, stable, tiny_backbone

from adafuse.continual.cli import main
from adafuse.continual.strategies import StrategyConfig
from adafuse.continual.strategies.ewc import diagonal_fisher, ewc_penalty, online_fisher
from adafuse.continual.strategies.lwf import distillation_loss
from adafuse.continual.strategies.replay import class_balanced_sample, slots_per_task
from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel

# ---- pure functions -------------------------------------------------------------------------------------------


def test_ewc_penalty_is_half_lambda_fisher_weighted_squared_distance():
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    anchors = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.5])}
    fisher = {"w": torch.tensor([2.0, 0.5]), "b": torch.tensor([4.0])}
    # 10/2 * (2*1 + 0.5*4 + 4*1) = 40
    assert ewc_penalty(params, anchors, fisher, 10.0).item() == pytest.approx(40.0)
    assert ewc_penalty(anchors, anchors, fisher, 10.0).item() == 0.0


def test_online_fisher_decays_the_earlier_tasks():
    first = online_fisher({}, {"w": torch.tensor([2.0])}, gamma=0.5)
    assert first["w"].tolist() == [2.0]
    assert online_fisher(first, {"w": torch.tensor([1.0])}, gamma=0.5)["w"].tolist() == [2.0]  # 0.5*2 + 1


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient():
    torch.manual_seed(0)
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("s", AdapterConfig(reduction_factor=4))
    model.add_head("h", 3)
    model.activate(["s"], head="h")
    model.set_trainable(adapters=["s"], heads=["h"])
    examples = [{"input_ids": [5, 9, 17, 4], "labels": 1}, {"input_ids": [7, 3], "labels": 2}]

    def collate(rows):
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True)
        return {
            "input_ids": ids,
            "attention_mask": (ids != 0).long(),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }

    fisher = diagonal_fisher(model, "h", examples, collate)
    assert set(fisher) == {n for n, p in model.named_parameters() if p.requires_grad and ".adapters.s." in n}
    name = next(n for n in fisher if n.endswith("up.weight"))
    param = dict(model.named_parameters())[name]
    model.eval()
    expected = torch.zeros_like(param)
    for example in examples:
        batch = collate([example])
        label = batch.pop("labels")
        (grad,) = torch.autograd.grad(F.log_softmax(model(**batch), -1)[0, label[0]], [param])
        expected += grad.pow(2) / len(examples)
    torch.testing.assert_close(fisher[name], expected)
    assert expected.abs().sum() > 0


def test_distillation_is_cross_entropy_of_softened_outputs_and_least_at_the_teacher():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    target = F.softmax(teacher / 2, -1)
    entropy = -(target * target.log()).sum()
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(entropy.item(), rel=1e-6)
    student = teacher.clone().requires_grad_(True)
    distillation_loss(student, teacher, 2.0).backward()
    assert student.grad.abs().max() < 1e-7  # the minimum: the teacher's own outputs
    assert distillation_loss(torch.zeros(1, 3), teacher, 2.0) > distillation_loss(teacher, teacher, 2.0)


def test_class_balanced_sample_is_balanced_seeded_and_bounded():
    labels = [0] * 90 + [1] * 8 + [2] * 2
    chosen = class_balanced_sample(labels, 12, seed=3)
    counts = [sum(labels[k] == c for k in chosen) for c in range(3)]
    assert counts == [5, 5, 2]  # as equal as the classes allow
    assert len(set(chosen)) == 12 and chosen == class_balanced_sample(labels, 12, seed=3)
    assert chosen != class_balanced_sample(labels, 12, seed=4)
    assert sorted(class_balanced_sample(labels, 500, seed=0)) == list(range(100))


def test_memory_slots_per_task_or_an_even_share_of_the_budget():
    assert slots_per_task(3, per_task=50, budget=None) == 50
    assert slots_per_task(3, per_task=50, budget=100) == 33


@pytest.mark.parametrize(
    "overrides", [{"base": "adapters"}, {"ewc_gamma": 1.5}, {"replay_ratio": 0}, {"replay_budget": 0}]
)
def test_bad_strategy_settings_are_refused(overrides):
    with pytest.raises(UserError, match="strategy."):
        StrategyConfig(**overrides)


# ---- end to end: a sequence built to forget ---------------------------------------------------------------------


pytestmark = pytest.mark.xdist_group("strategies")  # one worker: the module-scoped runs are made once


@pytest.fixture(scope="module")
def forgetting(tmp_path_factory):
    """The sequence built to forget (:func:`conftest.forgetting_sequence`) and naive fine-tuning's metrics on it."""
    folder = tmp_path_factory.mktemp("forget")
    sequence = forgetting_sequence(folder)
    naive = folder / "naive"
    assert main(["run", str(sequence), "--out", str(naive)]) == 0
    return folder, json.loads((naive / "metrics.json").read_text())


def strategy_run(folder, method: str) -> dict:
    """The uninterrupted run of ``method`` on the sequence (made once per test process)."""
    out = folder / method
    if not (out / "metrics.json").is_file():
        assert main(["run", str(folder / "seq.yaml"), "--out", str(out), "--method", method]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["ewc", "lwf", "replay"])
def test_each_strategy_forgets_less_than_naive_fine_tuning(forgetting, method):
    folder, naive = forgetting
    assert naive["bwt"] < -0.2 and naive["accuracy_matrix"][0][0] > 0.95  # it learns A, then forgets it
    out = folder / method
    metrics = strategy_run(folder, method)
    assert metrics["method"] == method and metrics["accuracy_matrix"][0] == naive["accuracy_matrix"][0]
    assert metrics["bwt"] > naive["bwt"] + 0.2, (metrics["bwt"], naive["bwt"])
    assert (out / "library" / "heads" / f"{method}@b.safetensors").is_file()


def test_replay_records_its_memory(forgetting):
    folder, _ = forgetting
    metrics = strategy_run(folder, "replay")
    assert metrics["strategy"]["replay_memory"] == {"0": 50, "1": 50}
    assert len(set(metrics["strategy"]["replay_indices"]["0"])) == 50


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "fault"),
    [("ewc", "train-step:100"), ("replay", "write:strategy@replay@b.safetensors"), ("lwf", "write:manifest.json:2")],
)
def test_a_strategy_resumes_after_kill_9_with_its_state(forgetting, tmp_path, method, fault):
    from test_faults import cli

    folder, _ = forgetting
    out = tmp_path / method
    args = ["run", str(folder / "seq.yaml"), "--out", str(out), "--method", method]
    killed = cli(*args, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert cli(*args).returncode == 0
    expected = strategy_run(folder, method)
    assert stable(json.loads((out / "metrics.json").read_text())) == stable(expected)


@pytest.mark.parametrize("method", ["ewc", "lwf", "replay"])
def test_each_strategy_runs_on_a_shared_adapter(method, tmp_path):
    from conftest import ROOT

    out = tmp_path / method
    smoke = [str(ROOT / "configs" / "sequence" / "smoke.yaml"), "--trainer.limit_train_batches", "3"]
    assert main(["run", *smoke, "--trainer.max_epochs", "1", "--method", method, "--out", str(out)]) == 0
    adapters = sorted(p.name for p in (out / "library" / "adapters").iterdir())
    assert adapters == [
        f"{method}@bbc-business.safetensors",
        f"{method}@bbc-sports.safetensors",
        f"{method}@bbc-tech.safetensors",
    ]


def test_a_strategy_on_several_devices_is_refused_with_one_line(tmp_path, capsys):
    from conftest import ROOT

    smoke = str(ROOT / "configs" / "sequence" / "smoke.yaml")
    assert main(["run", smoke, "--method", "ewc", "--trainer.devices", "2", "--out", str(tmp_path / "x")]) == 2
    assert "method: 'ewc' trains on one device" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
