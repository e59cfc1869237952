"""Source ranking for ``sources: {auto: K}``: the two proxies against their definitions, and the shared pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_backbone

from adafuse.continual.config import FuseConfig, RankingConfig, load_config
from adafuse.continual.jobs.rank import leep, probe, rank, score_sources
from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel


def test_leep_by_its_definition():
    generator = torch.Generator().manual_seed(0)
    theta = torch.rand(12, 3, generator=generator, dtype=torch.float64).softmax(-1)  # (N, Z)
    labels = torch.tensor([0, 1, 2, 3] * 3)  # C = 4
    expected = 0.0
    for i in range(12):  # Nguyen et al. 2020, eq. 2-4, written out with loops
        total = 0.0
        for z in range(3):
            joint_yz = sum(theta[n, z] for n in range(12) if labels[n] == labels[i]) / 12
            joint_z = sum(theta[n, z] for n in range(12)) / 12
            total += joint_yz / joint_z * theta[i, z]
        expected += math.log(total) / 12
    assert leep(theta, labels, 4) == pytest.approx(expected, abs=1e-9)


def test_leep_bounds():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = F.one_hot((labels + 1) % 3, 3).float()  # a relabelling: z determines y
    assert leep(perfect, labels, 3) == pytest.approx(0.0, abs=1e-9)
    constant = torch.full((6, 4), 0.25)  # says nothing: the log of the label prior
    assert leep(constant, labels, 3) == pytest.approx(math.log(1 / 3), abs=1e-9)


def test_probe_leave_one_out_in_closed_form_equals_refitting():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(15, 6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2] * 5)
    x = features - features.mean(0)
    y = F.one_hot(labels, 3).double()
    y = y - y.mean(0)
    penalty = (x @ x.t()).diagonal().mean() * 0.5
    errors = []
    for i in range(15):  # refit the kernel ridge without example i, predict it
        keep = [n for n in range(15) if n != i]
        gram = x[keep] @ x[keep].t()
        alpha = torch.linalg.solve(gram + penalty * torch.eye(14, dtype=x.dtype), y[keep])
        errors.append(float((y[i] - x[i] @ x[keep].t() @ alpha).pow(2).sum()))
    assert probe(features, labels, 3, ridge=0.5) == pytest.approx(-sum(errors) / 15, rel=1e-9)


def test_probe_prefers_features_that_separate_the_labels():
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat(10)
    noise = torch.randn(40, 8, generator=generator)
    informative = noise * 0.1 + F.one_hot(labels, 8).float()
    assert probe(informative, labels, 4) > probe(noise, labels, 4)


def test_rank_orders_best_first_unscored_last_and_marks_the_chosen():
    scores = {
        "a": {"leep": -1.0, "probe": -0.5},
        "b": {"leep": None, "probe": -0.1},
        "c": {"leep": -0.2, "probe": -0.9},
        "d": {"leep": -1.0, "probe": -0.2},
    }
    ranked = rank(scores, "leep", 2)
    assert [r["name"] for r in ranked] == ["c", "a", "d", "b"]  # ties keep library order
    assert [r["chosen"] for r in ranked] == [True, True, False, False]
    assert [r["name"] for r in rank(scores, "probe", 1)] == ["b", "d", "a", "c"]


def test_ranking_config_refuses_bad_values():
    for bad in ({"proxy": "vibes"}, {"group": 0}, {"ridge": 0.0}):
        with pytest.raises(UserError, match="ranking."):
            RankingConfig(**bad)
    for sources in ("{auto: 0}", "{auto: 2, all: 1}", "{best: 3}", "{auto: true}", "{auto: many}"):
        with pytest.raises(UserError, match="^sources: "):
            load_config(FuseConfig, None, ["--sources", sources])
    assert load_config(FuseConfig, None, ["--sources", "{auto: 3}"]).sources == {"auto": 3}


def _model_with_sources(count: int) -> AdaptedModel:
    model = AdaptedModel(tiny_backbone("bert"))
    for index in range(count):
        name = f"s{index}"
        model.add_adapter(name, AdapterConfig(reduction_factor=4))
        randomize(model, seed=index)  # distinct, non-identity adapters (the frozen backbone moves too: fine)
        model.add_head(f"rank@{name}", 3, "cls", 0.0)
    return model


def test_shared_pass_equals_one_source_at_a_time():
    model = _model_with_sources(3).eval()
    generator = torch.Generator().manual_seed(3)
    batch = {
        "input_ids": torch.randint(3, 100, (6, 9), generator=generator),
        "attention_mask": torch.ones(6, 9, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    batch["attention_mask"][0, -3:] = 0
    heads = {f"s{i}": f"rank@s{i}" for i in range(3)}
    shared = score_sources(model, [batch], list(heads), heads, 3, "mean", RankingConfig(group=3))
    alone = score_sources(model, [batch], list(heads), heads, 3, "mean", RankingConfig(group=1))
    for name in heads:
        assert shared[name]["leep"] == pytest.approx(alone[name]["leep"], abs=1e-6)
        assert shared[name]["probe"] == pytest.approx(alone[name]["probe"], abs=1e-6)
    with torch.no_grad():  # and one source by itself, activated the plain way
        model.activate(["s1"], head="rank@s1")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        probabilities = model(**inputs).softmax(-1)
    assert shared["s1"]["leep"] == pytest.approx(leep(probabilities, batch["labels"], 3), abs=1e-6)
    assert len({round(shared[n]["probe"], 6) for n in heads}) == 3  # the sources do differ
