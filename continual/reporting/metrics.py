"""Continual-learning metrics: pure functions of the accuracy matrix.

``R[i][j]`` is the test accuracy on task j after training task i (T tasks; ``None`` where not evaluated).
Entries that a formula needs but that are ``None`` are skipped; a metric with no term is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(r: Matrix) -> float | None:
    """ACC = (1/T) sum_j R[T-1][j]: mean final accuracy over all tasks (Lopez-Paz & Ranzato 2017, GEM)."""
    return _mean([v for v in r[-1] if v is not None]) if r else None


def backward_transfer(r: Matrix) -> float | None:
    """BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017, Eq. 3); < 0 is forgetting."""
    t = len(r)
    return _mean([r[-1][j] - r[j][j] for j in range(t - 1) if r[-1][j] is not None and r[j][j] is not None])


def forward_transfer(r: Matrix, baseline: Sequence[float | None]) -> float | None:
    """FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b_j), b_j the untrained model's accuracy on task j
    (Lopez-Paz & Ranzato 2017, Eq. 4)."""
    t = len(r)
    return _mean(
        [r[j - 1][j] - baseline[j] for j in range(1, t) if r[j - 1][j] is not None and baseline[j] is not None]
    )


def forgetting(r: Matrix) -> float | None:
    """F = 1/(T-1) sum_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j]) (Chaudhry et al. 2018, RWalk, Eq. 8).

    The max runs over the rows from the one that trained task j on (``None`` entries are skipped): the row
    before it holds task j untrained (for FWT), which is no knowledge to forget.
    """
    t = len(r)
    terms = []
    for j in range(t - 1):
        if r[-1][j] is None:
            continue
        earlier = [r[l][j] for l in range(j, t - 1) if r[l][j] is not None]  # noqa: E741 - the paper's index
        if earlier:
            terms.append(max(earlier) - r[-1][j])
    return _mean(terms)


def intransigence(r: Matrix, reference: Sequence[float | None]) -> list[float | None]:
    """I_j = a*_j - R[j][j], a*_j the accuracy of a reference model trained on task j alone
    (Chaudhry et al. 2018, RWalk, Eq. 9); one value per task."""
    return [reference[j] - r[j][j] if reference[j] is not None and r[j][j] is not None else None for j in range(len(r))]


def summarize(r: Matrix, baseline: Sequence[float | None], reference: Sequence[float | None] | None = None) -> dict:
    """All metrics at once, as stored in metrics.json."""
    per_task_intransigence = intransigence(r, reference) if reference is not None else [None] * len(r)
    values = [v for v in per_task_intransigence if v is not None]
    return {
        "acc": average_accuracy(r),
        "bwt": backward_transfer(r),
        "fwt": forward_transfer(r, baseline),
        "forgetting": forgetting(r),
        "intransigence": _mean(values),
        "intransigence_per_task": per_task_intransigence,
    }
