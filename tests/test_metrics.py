import pytest

from adafuse.continual.reporting.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    intransigence,
    summarize,
)

# Hand-made: 3 tasks.      task0 task1 task2
R = [[0.90, 0.40, None], [0.80, 0.95, 0.30], [0.70, 0.85, 0.99]]
B = [0.50, 0.45, 0.35]


def test_acc():
    assert average_accuracy(R) == pytest.approx((0.70 + 0.85 + 0.99) / 3)


def test_bwt():
    # ((0.70 - 0.90) + (0.85 - 0.95)) / 2
    assert backward_transfer(R) == pytest.approx(-0.15)


def test_fwt():
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.40 - 0.45) + (0.30 - 0.35)) / 2
    assert forward_transfer(R, B) == pytest.approx(-0.05)


def test_forgetting():
    # task0: max(0.90, 0.80) - 0.70 = 0.20; task1: max(0.40, 0.95) - 0.85 = 0.10
    assert forgetting(R) == pytest.approx(0.15)


def test_intransigence():
    values = intransigence(R, [0.95, 0.95, None])
    assert values[0] == pytest.approx(0.05) and values[1] == pytest.approx(0.0) and values[2] is None


def test_single_task():
    r = [[0.8]]
    assert average_accuracy(r) == pytest.approx(0.8)
    assert backward_transfer(r) is None and forgetting(r) is None and forward_transfer(r, [0.5]) is None


def test_missing_entries_are_skipped():
    r = [[0.9, None], [None, 0.7]]
    assert backward_transfer(r) is None
    assert forward_transfer(r, [0.5, 0.5]) is None
    assert average_accuracy(r) == pytest.approx(0.7)


def test_isolation_gives_exact_zeros():
    r = [[0.9, 0.5, None], [0.9, 0.8, 0.5], [0.9, 0.8, 0.7]]
    m = summarize(r, [0.5, 0.5, 0.5])
    assert m["bwt"] == 0.0 and m["forgetting"] == 0.0 and m["fwt"] == 0.0


def test_forgetting_ignores_the_untrained_cell_before_a_task():
    # task 1 scored 0.9 untrained (row 0, for FWT) and 0.7 once trained; final 0.7: nothing was forgotten
    r = [[0.8, 0.9, None], [0.8, 0.7, 0.5], [0.6, 0.7, 0.9]]
    assert forgetting(r) == pytest.approx(((0.8 - 0.6) + (0.7 - 0.7)) / 2)
