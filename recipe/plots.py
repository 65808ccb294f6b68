"""Renders a recipe.metrics report: the markdown tables (metrics.md) and the position plot (position.png).

The layout follows the paper: Table 1 is one row per system with the metrics as columns (and the same
per task when the predictions span several tasks); Figure 4 is each metric against the generated-token
segment, one line per system.
"""

from __future__ import annotations

import math
from pathlib import Path

from recipe.metrics import METRICS

LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "bleu": "BLEU", "meteor": "METEOR",
          "bertscore": "BERTScore-F1"}


def _value(entry: dict, metric: str) -> float | None:
    """A metric's number from a system/task entry, None when unavailable or skipped."""
    v = entry.get(metric)
    if metric == "bertscore":
        v = v.get("f1") if isinstance(v, dict) and v.get("status") == "ok" else None
    return v if isinstance(v, (int, float)) else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _metric_table(rows: list[tuple[str, dict]], first: str) -> list[str]:
    cols = [*METRICS, "bertscore"]
    lines = [f"| {first} | n | " + " | ".join(LABELS[c] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for label, entry in rows:
        lines.append(f"| {label} | {entry['n']} | " + " | ".join(_fmt(_value(entry, c)) for c in cols) + " |")
    return lines


def markdown(report: dict) -> str:
    """The report as markdown: overall table, per-task table, position tables, notes on n/a entries."""
    systems = report["systems"]
    out = ["# Evaluation", "",
           f"Scale {report['scale']} ({report['conventions']['scale']}). "
           f"Position segments by generator tokens of {report['tokenizer']}.", "",
           "## Overall (Table 1 layout)", ""]
    out += _metric_table(list(systems.items()), "system")
    if any("by_task" in e for e in systems.values()):
        out += ["", "## Per task", ""]
        rows = [(f"{name} / {task}", t) for name, e in systems.items()
                for task, t in e.get("by_task", {}).items()]
        out += _metric_table(rows, "system / task")
    segs = report["segments"]
    out += ["", "## By generated-token position (Figure 4 layout)", "",
            "Each cell: score of that segment against the full reference. `n` = samples whose prediction "
            "reaches the segment; the others (empty segment) are excluded, not scored as 0.", ""]
    for metric in METRICS:
        if not any(isinstance(s.get(metric), (int, float)) for e in systems.values()
                   for s in e.get("position", {}).get("segments", [])):
            continue
        out += [f"### {LABELS[metric]}", "", "| system | " + " | ".join(segs) + " |",
                "|---|" + "---:|" * len(segs)]
        for name, e in systems.items():
            cells = [f"{_fmt(s.get(metric))} (n={s['n_scored']})" for s in e["position"]["segments"]]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    notes = [f"- {name}: {LABELS[m]} {e[m]['status']}: {e[m]['reason']}" for name, e in systems.items()
             for m in ("meteor", "bertscore") if isinstance(e.get(m), dict) and e[m].get("status") != "ok"]
    if notes:
        out += ["## Notes", "", *notes, ""]
    return "\n".join(out).rstrip() + "\n"


def write_markdown(report: dict, path: str | Path) -> None:
    """Write `markdown(report)` to `path`."""
    Path(path).write_text(markdown(report), encoding="utf-8")


def plot_position(report: dict, path: str | Path) -> None:
    """Figure 4: one panel per metric, score vs token segment, one line per system (gaps = no samples)."""
    import matplotlib
    matplotlib.use("Agg")  # headless: CI and clusters have no display
    import matplotlib.pyplot as plt

    segs = report["segments"]
    metrics = [m for m in METRICS if any(isinstance(s.get(m), (int, float)) for e in report["systems"].values()
                                         for s in e.get("position", {}).get("segments", []))]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, e in report["systems"].items():
            ys = [s.get(metric) for s in e["position"]["segments"]]
            ax.plot(range(len(segs)), [math.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_xticks(range(len(segs)), segs, rotation=20)
        ax.set_title(LABELS[metric])
        ax.set_xlabel("generated tokens")
        ax.set_ylabel(f"score ({report['scale']})")
        ax.grid(alpha=0.3)
    if metrics:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
