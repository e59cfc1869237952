"""Reports rendered from metrics.json: Markdown tables and heatmaps (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from adafuse.fusion.errors import UserError
from adafuse.fusion.storage import atomic_write


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# Figures stop growing (and stop carrying per-cell numbers) past this many tasks or sources: a 50-task
# matrix at one inch a cell would take a gigabyte to render; the numbers are in report.md anyway.
MAX_INCHES = 16.0
ANNOTATE_MAX = 20


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def heatmap(matrix: list[list[float | None]], rows: list[str], cols: list[str], title: str, ax) -> None:
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training")
    ax.set_title(title)
    if len(cols) <= ANNOTATE_MAX:
        annotate(ax, matrix, "{:.3f}", dark_below=0.6)


def annotate(ax, matrix: list[list[float | None]], fmt: str, dark_below: float) -> None:
    """Write each cell's value on a heatmap, white on dark cells."""
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                color = "white" if value < dark_below else "black"
                ax.text(j, i, fmt.format(value), ha="center", va="center", color=color, fontsize=8)


def run_markdown(metrics: dict) -> str:
    tasks = metrics["tasks"]
    kind = f", adapter kind `{metrics['adapter_kind']}`" if metrics.get("adapter_kind") else ""
    parts = [f"# adafuse run — method `{metrics['method']}`{kind}", ""]
    names = sorted({metrics["per_task"][t].get("metric", "accuracy") for t in tasks})
    parts += ["## Accuracy matrix", "", f"R[i][j]: test {' / '.join(names)} on task j (column) after training task i"]
    parts += ["(row): each task's primary metric (see the per-task table).", ""]
    parts.append(
        _table(["after \\ on", *tasks], [[t, *row] for t, row in zip(tasks, metrics["accuracy_matrix"], strict=True)])
    )
    if metrics.get("setting") == "class-incremental":
        parts += [
            "",
            "Class-incremental: the task is not given; each input is classified among every class seen so far.",
        ]
        titles = {
            "oracle_accuracy": "Accuracy given the task (oracle):",
            "task_id_accuracy": "Task identification (share of task j's inputs routed to task j):",
        }
        for key, title in titles.items():
            if f"{key}_matrix" in metrics:
                rows = [[t, *row] for t, row in zip(tasks, metrics[f"{key}_matrix"], strict=True)]
                parts += ["", title, "", _table(["after \\ on", *tasks], rows)]
    parts += ["", "## Metrics", ""]
    parts.append(
        _table(
            ["ACC", "BWT", "FWT", "forgetting", "intransigence"],
            [[metrics[k] for k in ("acc", "bwt", "fwt", "forgetting", "intransigence")]],
        )
    )
    parts += ["", "## Per task", ""]
    rows = []
    for name in tasks:
        t = metrics["per_task"][name]
        rows.append(
            [
                name,
                t.get("metric", "accuracy"),
                t.get("final_accuracy"),
                t.get("final_macro_f1"),
                t.get("baseline_accuracy"),
                t.get("train_wall_time_s"),
                t.get("trainable_params"),
                t.get("trainable_pct"),
                "yes" if t.get("reused") else "no",
            ]
        )
    parts.append(
        _table(
            [
                "task",
                "metric",
                "test score",
                "test macro-F1",
                "untrained acc",
                "train time (s)",
                "trainable params",
                "% of backbone",
                "from library",
            ],
            rows,
        )
    )
    strategy = {k: v for k, v in (metrics.get("strategy") or {}).items() if not isinstance(v, dict | list)}
    if strategy:
        parts += ["", "Strategy: " + ", ".join(f"{k} {v}" for k, v in strategy.items()) + "."]
    parts += [
        "",
        f"Backbone `{metrics['backbone']['name']}` ({metrics['backbone']['params']:,} parameters, "
        f"fingerprint `{metrics['backbone']['fingerprint'][:16]}`), seed {metrics['seed']}, "
        f"wall time {metrics['wall_time_s']:.1f} s.",
        "",
    ]
    return "\n".join(parts)


def fusion_markdown(metrics: dict) -> str:
    parts = [f"# adafuse fuse — `{metrics['method']}` for `{metrics['target']}`", ""]
    names = list(metrics["test"])  # the target type's metrics, primary first
    parts.append(_table(["split", *names], [[s, *(metrics[s].get(n) for n in names)] for s in ("validation", "test")]))
    if metrics.get("sources"):
        parts += ["", "## Source tasks (test accuracy before / after fusion training)", ""]
        parts.append(
            _table(
                ["source", "before", "after"],
                [
                    [s, metrics["source_accuracy_before"].get(s), metrics["source_accuracy_after"].get(s)]
                    for s in metrics["sources"]
                ],
            )
        )
    if metrics.get("ranking"):
        parts += ["", ranking_markdown(metrics["ranking"])]
    if metrics.get("composition_weights"):
        parts += ["", "## Composition weights (LoraHub: one weight per LoRA source)", ""]
        parts.append(_table(["source", "weight"], [[s, w] for s, w in metrics["composition_weights"].items()]))
    parts += [
        "",
        f"Trainable parameters: {metrics.get('trainable_params')}, wall time {metrics.get('wall_time_s')} s.",
        "",
    ]
    return "\n".join(parts)


def ranking_markdown(ranking: dict) -> str:
    """The source ranking of ``sources: {auto: K}``: every candidate's proxies, best first, the chosen marked."""
    header = (
        f"## Source ranking ({ranking['proxy']}, top {ranking['top_k']} chosen; {ranking['examples']} training "
        f"examples at {ranking['max_length']} tokens, {ranking['wall_time_s']:.1f} s)"
    )
    rows = [
        [place, row["name"], row["leep"], row["probe"], "yes" if row["chosen"] else ""]
        for place, row in enumerate(ranking["sources"], 1)
    ]
    return "\n".join([header, "", _table(["rank", "source", "leep", "probe", "chosen"], rows)])


def write_run_report(out: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write(out / "report.md", run_markdown(metrics).encode())
    size = min(MAX_INCHES, max(4.0, 1.1 * len(metrics["tasks"]) + 2))
    figure, ax = plt.subplots(figsize=(size, size * 0.85))
    heatmap(
        metrics["accuracy_matrix"], metrics["tasks"], metrics["tasks"], f"accuracy matrix ({metrics['method']})", ax
    )
    atomic_write(out / "accuracy_matrix.png", _png(figure))
    plt.close(figure)


def write_fusion_report(out: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write(out / "report.md", fusion_markdown(metrics).encode())
    attention = metrics.get("attention")
    if attention:
        rows = [f"layer {i}" for i in range(len(attention))]
        width = min(MAX_INCHES, 1.2 * len(metrics["sources"]) + 3)
        figure, ax = plt.subplots(figsize=(width, min(MAX_INCHES, 0.5 * len(rows) + 2)))
        image = ax.imshow(attention, vmin=0.0, vmax=1.0, cmap="magma")
        ax.set_xticks(range(len(metrics["sources"])), metrics["sources"], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(f"mean fusion attention on {metrics['target']} (test)")
        if len(metrics["sources"]) <= ANNOTATE_MAX:
            annotate(ax, attention, "{:.2f}", dark_below=0.5)
        figure.colorbar(image, ax=ax)
        atomic_write(out / "fusion_attention.png", _png(figure))
        plt.close(figure)


def write_results(out: Path, metrics: dict, write_report) -> None:
    """metrics.json, then the report that ``write_report(out, metrics)`` renders from it."""
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    write_report(out, metrics)


def read_metrics(folder: Path) -> dict:
    path = Path(folder) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path}: not found (expected the output folder of 'adafuse run' or 'adafuse fuse')") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict) or "method" not in metrics or not ("tasks" in metrics or "target" in metrics):
        raise UserError(f"{path}: expected the keys 'method' and 'tasks' (a run) or 'target' (a fusion)")
    return metrics


def _seconds(metrics: dict) -> str:
    return "–" if metrics.get("wall_time_s") is None else f"{metrics['wall_time_s']:.1f}"


def comparison_markdown(runs: list[tuple[Path, dict]]) -> str:
    rows, fusion_rows = [], []
    for folder, m in runs:
        if "tasks" in m:
            params = sum((t.get("trainable_params") or 0) for t in m["per_task"].values())
            method = f"{m['method']} ({m['adapter_kind']})" if m.get("adapter_kind") else m["method"]
            if m.get("setting") == "class-incremental":
                method += f", class-incremental (oracle ACC {_fmt(m.get('final_oracle_accuracy'))})"
            extra = (m.get("strategy") or {}).get("extra_memory", "–")
            scores = [m[k] for k in ("acc", "bwt", "fwt", "forgetting", "intransigence")]
            rows.append([str(folder), method, *scores, params, extra, _seconds(m)])
        else:
            fusion_rows.append(
                [
                    str(folder),
                    m["method"],
                    m["target"],
                    m["test"].get(m.get("metric", "accuracy")),
                    m["test"].get("macro_f1"),
                    m.get("trainable_params"),
                    _seconds(m),
                ]
            )
    parts = ["# adafuse — runs side by side", ""]
    if rows:
        parts.append(
            _table(
                [
                    "run",
                    "method",
                    "ACC",
                    "BWT",
                    "FWT",
                    "forgetting",
                    "intransigence",
                    "trainable params (sum of tasks)",
                    "extra memory",
                    "time (s)",
                ],
                rows,
            )
        )
    if fusion_rows:
        parts += [
            "",
            _table(
                ["run", "method", "target", "test acc", "test macro-F1", "trainable params", "time (s)"], fusion_rows
            ),
        ]
    return "\n".join(parts) + "\n"


def write_comparison(runs: list[tuple[Path, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write(out / "comparison.md", comparison_markdown(runs).encode())
    sequences = [(f, m) for f, m in runs if "tasks" in m]
    if sequences:
        figure, axes = plt.subplots(1, len(sequences), figsize=(5.5 * len(sequences), 5), squeeze=False)
        for ax, (folder, m) in zip(axes[0], sequences, strict=True):
            heatmap(m["accuracy_matrix"], m["tasks"], m["tasks"], f"{m['method']} ({Path(folder).name})", ax)
        atomic_write(out / "comparison.png", _png(figure))
        plt.close(figure)
