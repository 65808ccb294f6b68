"""Evaluation report: score prediction files side by side (evaluation.metrics), then write
metrics.json, metrics.md (the paper's Table 1 / Figure 4 layout) and position.png (evaluation.plots).

    python -m evaluation.report --predictions A.jsonl [B.jsonl ...] --out DIR \
        [--names A B] [--tokenizer PATH] [--bertscore-model PATH_OR_NONE]       # or: bash launch/eval.sh
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .bertscore import bertscore_samples
from .metrics import (CONVENTIONS, DEFAULT_BOUNDS, METRICS, SCALE, MissingNltkData, mean_or_none, aggregate,
                      load_tokenizer, require_nltk_data, score_samples, segment_names)
from .plots import plot_position
from .predictions import InputError, load_predictions

log = logging.getLogger(__name__)

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


def evaluate_rows(rows: list[dict], tokenizer, *, bounds=DEFAULT_BOUNDS, meteor=True, bertscore_model=None,
                  bertscore_layers=None, name: str = "") -> dict:
    """One system's entry: overall metrics, generation stats, and `by_task` when rows span several tasks."""
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    log.info("%s: ROUGE-1/ROUGE-L%s per sample and per position segment over %d samples",
             name, "/METEOR" if meteor else "", len(rows))
    records = score_samples(preds, refs, tokenizer, bounds=bounds, meteor=meteor, progress=True,
                            desc=f"scoring {name}")
    bs = bertscore_samples(preds, refs, bertscore_model, num_layers=bertscore_layers, progress=True)
    log.info("%s: corpus BLEU and averages", name)
    entry = aggregate(records, bs, bounds=bounds)
    for key in ("n_tokens", "seconds"):
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            entry.setdefault("generation", {})[f"mean_{key}"] = mean_or_none(vals)
    tasks = sorted({str(r.get("task", "unknown")) for r in rows})
    if len(tasks) > 1:
        entry["by_task"] = {t: aggregate(records, bs, [i for i, r in enumerate(rows)
                                                       if str(r.get("task", "unknown")) == t], bounds)
                            for t in tasks}
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: score prediction files side by side and write metrics.json, metrics.md and position.png."""
    ap = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__.split("\n")[0])
    ap.add_argument("--predictions", nargs="+", required=True, help="prediction JSONL file(s)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--names", nargs="+", help="system names (default: file stems)")
    ap.add_argument("--tokenizer", help="generator tokenizer folder for position segments "
                                        "(default: the project's tiny tokenizer)")
    ap.add_argument("--bounds", nargs="+", type=int, default=list(DEFAULT_BOUNDS),
                    help="token positions where segments start (default: 100 200 300)")
    ap.add_argument("--bertscore-model", default="none", help="local BERTScore model folder, or none")
    ap.add_argument("--bertscore-layers", type=int, help="layer to take embeddings from")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (no WordNet needed)")
    ap.add_argument("--dedup", action="store_true", help="keep the first row of a repeated id instead of failing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        names = args.names or [Path(p).stem for p in args.predictions]
        if len(names) != len(args.predictions):
            raise InputError(f"{len(names)} --names for {len(args.predictions)} prediction files")
        if len(set(names)) != len(names):
            raise InputError(f"system names must be unique, got {names}: pass --names")
        systems_rows = {n: load_predictions(p, args.dedup) for n, p in zip(names, args.predictions)}
        if len({frozenset(str(r["id"]) for r in rows) for rows in systems_rows.values()}) > 1:
            log.warning("the prediction files do not cover the same ids: rows are not directly comparable")
        if not args.no_meteor:
            require_nltk_data()
        tokenizer = load_tokenizer(args.tokenizer)
        systems = {}
        for (name, rows), path in zip(systems_rows.items(), args.predictions):
            systems[name] = {"file": str(path), **evaluate_rows(
                rows, tokenizer, bounds=tuple(args.bounds), meteor=not args.no_meteor,
                bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers, name=name)}
    except (InputError, MissingNltkData, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"scale": SCALE, "conventions": CONVENTIONS, "bounds": [0, *args.bounds],
              "segments": segment_names(args.bounds),
              "tokenizer": args.tokenizer or "flythinker_worker.tiny (tiny tokenizer)",
              "tasks": sorted({str(r.get("task", "unknown")) for rows in systems_rows.values() for r in rows}),
              "systems": systems}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "metrics.md")
    plot_position(report, out / "position.png", METRICS, LABELS)
    log.info("wrote %s, %s, %s", out / "metrics.json", out / "metrics.md", out / "position.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
