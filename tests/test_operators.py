"""Operators dispatched per step (benchmarks/operators.py): on a GPU each costs a launch, so a count that grows
makes every small step slower there. These are the counts of one step on the tiny BERT (2 blocks), forward and
backward; a change that adds operators must lower them somewhere else or raise the budget knowingly."""

from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {  # (configuration, step): operators of one step, 2 blocks, embeddings and head included
    ("floor", "train"): 234, ("floor", "infer"): 69,
    ("single-bottleneck", "train"): 267, ("single-bottleneck", "infer"): 81,
    ("single-parallel", "train"): 265, ("single-parallel", "infer"): 79,
    ("single-compacter", "train"): 371, ("single-compacter", "infer"): 117,
    ("single-lora", "train"): 326, ("single-lora", "infer"): 97,
    ("single-prefix", "train"): 340, ("single-prefix", "infer"): 93,
    ("fusion-2", "train"): 430, ("fusion-2", "infer"): 139,  # 16 tokens: the per-token association
    ("fusion-8", "train"): 430, ("fusion-8", "infer"): 139,
}  # fmt: skip
LARGE = {("fusion-2", "train"): 480, ("fusion-8", "train"): 480}  # 80 tokens: the re-associated form


def _script():
    return load_script(ROOT / "benchmarks" / "operators.py")


@pytest.fixture(scope="module")
def records():
    return {
        (r["configuration"], r["step"]): r
        for r in _script().measure(str(ROOT / "configs/backbone/tiny-bert.yaml"), 2, 8)
    }


@pytest.fixture(scope="module")
def large_steps():
    """Fusion training steps of 2 x 40 tokens: more than the K(r+1) = 72 rows of K = 8, so both K take the
    re-associated form (its per-step weight products)."""
    return {
        (r["configuration"], r["step"]): r
        for r in _script().measure(str(ROOT / "configs/backbone/tiny-bert.yaml"), 2, 40, only="fusion")
        if r["step"] == "train"
    }


def test_no_operator_count_grows(records, large_steps):
    grown = {key: (r["operators"], BUDGET[key]) for key, r in records.items() if r["operators"] > BUDGET[key]}
    grown |= {key: (r["operators"], LARGE[key]) for key, r in large_steps.items() if r["operators"] > LARGE[key]}
    assert grown == {}, "operators per step (now, budget)"


def test_fusion_dispatches_as_many_operators_whatever_k(records, large_steps):
    """The K source adapters run as one batched computation: K = 8 issues no more kernels than K = 2, in either
    association."""
    for step in ("train", "infer"):
        assert records[("fusion-8", step)]["operators"] == records[("fusion-2", step)]["operators"]
    assert large_steps[("fusion-8", "train")]["operators"] == large_steps[("fusion-2", "train")]["operators"]


def test_the_counter_sees_the_backward_pass():
    import torch

    counter = _script().OperatorCounter()
    x = torch.ones(3, requires_grad=True)
    with counter:
        (x * 2).sum().backward()
    assert counter.total >= 3 and "aten.mul" in counter.counts
