"""Training curves: every figure of a run's ``metrics.jsonl`` against the step, in one PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from training.loop import parse_metrics_line

PLOT_FILE = "metrics.png"
"""Name of the plot next to ``metrics.jsonl``."""
_SKIP = frozenset({"step"})


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics file (a torn last line is skipped)."""
    records = (parse_metrics_line(line) for line in path.read_text().splitlines())
    return [record for record in records if record is not None]


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(metrics: Path, out: Path, *, title: str = "") -> Path:
    """Draw each numeric figure of ``metrics`` (raw and smoothed) into ``out``; returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics}: no metrics to plot")
    names = [
        k
        for k, v in records[-1].items()
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    window = max(1, len(records) // 20)
    for ax, name in zip(axes.flat, names, strict=False):
        points = [(r["step"], float(r[name])) for r in records if name in r]
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1)
        if window > 1:
            ax.plot(steps, _smoothed(values, window), color="tab:blue", linewidth=1.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
