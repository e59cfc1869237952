"""``python -m adafuse.continual.reporting.summary DIR``: the short summary printed at the end of ``make demo``."""

from __future__ import annotations

import sys
from pathlib import Path

from adafuse.continual.reporting.report import read_metrics


def summary(root: Path) -> str:
    sequence = read_metrics(root / "sequence")
    lines = ["", "=== adafuse demo summary ===", f"sequence ({sequence['method']}):"]
    for name in sequence["tasks"]:
        lines.append(f"  {name:<20} test accuracy {sequence['per_task'][name]['final_accuracy']:.4f}")
    lines.append(f"  ACC {sequence['acc']:.4f}   BWT {sequence['bwt']:+.4f}   forgetting {sequence['forgetting']:+.4f}")
    fusion, single = read_metrics(root / "fusion"), read_metrics(root / "single-adapter")
    same = fusion["source_accuracy_before"] == fusion["source_accuracy_after"]
    gain = 100 * (fusion["test"]["accuracy"] - single["test"]["accuracy"])
    lines.append(
        f"{fusion['target']} (test accuracy): fusion {fusion['test']['accuracy']:.4f}, single adapter "
        f"{single['test']['accuracy']:.4f}, gain {gain:+.1f} points; source accuracies unchanged: {same}"
    )
    lines.append(f"report: {root / 'comparison.md'} (per run: {root}/*/report.md)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
