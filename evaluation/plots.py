"""Figures of an evaluation report; they take the report's data and import nothing of ours."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def plot_position(report: dict, path: str | Path, metrics: Sequence[str], labels: dict[str, str]) -> None:
    """Figure 4: one panel per metric, score vs token segment, one line per system (gaps = no samples),
    with its 95% bootstrap CI as a band where the segments carry one ("ci").
    `report` is evaluation.report's dict (segments, scale, systems[*].position.segments)."""
    import matplotlib
    matplotlib.use("Agg")  # headless: CI and clusters have no display
    import matplotlib.pyplot as plt

    segs = report["segments"]
    metrics = [m for m in metrics if any(isinstance(s.get(m), (int, float)) for e in report["systems"].values()
                                         for s in e.get("position", {}).get("segments", []))]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, e in report["systems"].items():
            ys = [s.get(metric) for s in e["position"]["segments"]]
            line, = ax.plot(range(len(segs)), [math.nan if y is None else y for y in ys], marker="o", label=name)
            cis = [(s.get("ci") or {}).get(metric) for s in e["position"]["segments"]]
            if any(cis):
                ax.fill_between(range(len(segs)), [math.nan if c is None else c[0] for c in cis],
                                [math.nan if c is None else c[1] for c in cis], color=line.get_color(), alpha=0.15)
        ax.set_xticks(range(len(segs)), segs, rotation=20)
        ax.set_title(labels.get(metric, metric))
        ax.set_xlabel("generated tokens")
        ax.set_ylabel(f"score ({report['scale']})")
        ax.grid(alpha=0.3)
    if metrics:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
