"""Across-seed evaluation: systems trained (and decoded) with several seeds, scored side by side.

    python -m evaluation.seeds --seeds 1 2 3 --out DIR \
        --system Non-pers non_pers.jsonl --system RAG rag.jsonl \
        --system SFT sft_s1.jsonl sft_s2.jsonl sft_s3.jsonl \
        --system FlyThinker fly_s1.jsonl fly_s2.jsonl fly_s3.jsonl  [--against SFT] [report options]

Each `--system NAME FILE...` gives one predictions file per seed (in `--seeds` order), or ONE file for a
system that does not depend on the seed (the untrained baselines); that file then stands in for every
seed in paired comparisons. Every file is scored once (evaluation.metrics), then:

- pooled over seeds: each system's mean over all its rows with a 95% bootstrap CI over rows, and a
  paired bootstrap of the reference system against every other on the (seed, row) pairs both scored
  (evaluation.report's tables, figure and metrics.json layout);
- across seeds: each system's metric per seed, their mean and sample standard deviation (ddof 1);
- a plain reading per comparison, made from those numbers by fixed rules (`verdict`): a difference is
  called significant only when the paired CI excludes 0, p < 0.05 AND every seed's difference has the
  same sign; with one seed the reading says that seed-to-seed variation was not measured.

Writes DIR/metrics.json (evaluation.report's layout plus `systems[*].seeds`, `readings`, `reading`),
DIR/metrics.md and DIR/position.png, and prints the headline reading (reference vs `--against`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import stats
from .bertscore import DEFAULT_MODEL, bertscore_samples
from .metrics import (CONVENTIONS, DEFAULT_BOUNDS, METRICS, SCALE, MissingNltkData, aggregate, bootstrap_settings,
                      load_tokenizer, require_nltk_data, row_values, score_samples, segment_names)
from .plots import plot_position
from .predictions import InputError, load_predictions
from .report import LABELS, _value, bertscore_label, compare_systems, markdown, pick_reference

log = logging.getLogger(__name__)

SEED_METRICS = (*METRICS, "bertscore")
HEADLINE_METRIC = "rouge1"


# ---- numbers -------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with ddof 1) of `values`; std is None for fewer than 2 values,
    both None for none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def across_seeds(per_seed: Sequence[dict], metrics: Sequence[str] = SEED_METRICS) -> dict:
    """{metric: {"values", "mean", "std"}} over per-seed entries (evaluation.metrics.aggregate dicts);
    a metric missing in any seed (METEOR skipped, BERTScore unavailable) is left out."""
    out = {}
    for m in metrics:
        values = [_value(entry, m) for entry in per_seed]
        if values and all(v is not None for v in values):
            mean, std = mean_std(values)
            out[m] = {"values": values, "mean": mean, "std": std}
    return out


def seed_deltas(reference: Sequence[float], other: Sequence[float]) -> list[float]:
    """Per-seed differences reference - other; a single `other` value (a seed-independent system) is
    compared with every reference seed."""
    if len(other) == 1:
        other = list(other) * len(reference)
    if len(reference) == 1 and len(other) > 1:
        reference = list(reference) * len(other)
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference seeds but {len(other)} for the other system")
    return [r - o for r, o in zip(reference, other)]


def verdict(delta: float, ci: Sequence[float] | None, p_value: float | None, deltas: Sequence[float],
            reference: str, other: str, alpha: float = 1 - stats.LEVEL) -> tuple[str, str]:
    """(code, text): the rule-based reading of one comparison. Codes: `untested` (no bootstrap),
    `no_difference` (CI includes 0 or p >= alpha), `seeds_disagree` (significant over rows but some seed's
    difference has the other sign or is 0), `one_seed` (significant, a single seed), `higher` / `lower`
    (significant and every one of >= 2 seeds agrees)."""
    if ci is None or p_value is None or math.isnan(p_value):
        return "untested", "not tested (no bootstrap)"
    if ci[0] <= 0 <= ci[1] or p_value >= alpha or delta == 0:
        return "no_difference", "no significant difference at this scale"
    winner = reference if delta > 0 else other
    favour = sum(1 for d in deltas if d * delta > 0)
    if len(deltas) >= 2 and favour < len(deltas):
        return "seeds_disagree", (f"the rows favour {winner} but the seeds disagree ({favour} of {len(deltas)} "
                                  "favour it): no reliable difference")
    direction = "higher" if delta > 0 else "lower"
    if len(deltas) < 2:
        return "one_seed", (f"{reference} scores {direction} than {other} on these test rows, from one seed only "
                            "(seed-to-seed variation not measured)")
    return direction, (f"{reference} scores {direction} than {other} (CI excludes 0 and all {len(deltas)} seeds "
                       "agree), on this test set at this scale")


def _mean_text(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.1f} (one seed)" if std is None else f"{mean:.1f}±{std:.1f}"


def reading(reference: str, other: str, metric: str, comparison: dict | None, reference_seeds: Sequence[float],
            other_seeds: Sequence[float]) -> dict:
    """One comparison's reading: {"reference", "other", "metric", "code", "text", ...}; `comparison` is a
    paired result ({"delta", "ci", "p_value"}) or None (no bootstrap)."""
    label = LABELS.get(metric, metric)
    deltas = seed_deltas(reference_seeds, other_seeds)
    delta = comparison["delta"] if comparison else (float(np.mean(deltas)) if deltas else math.nan)
    ci = comparison.get("ci") if comparison else None
    p = comparison.get("p_value") if comparison else None
    code, text = verdict(delta, ci, p, deltas, reference, other)
    stat = f"{delta:+.1f}"
    if ci is not None and p is not None:
        stat += f" (95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}], p={p:.3f}; "
    else:
        stat += " ("
    stat += f"across seeds {_mean_text(reference_seeds)} vs {_mean_text(other_seeds)})"
    return {"reference": reference, "other": other, "metric": metric, "code": code, "delta": delta, "ci": ci,
            "p_value": p, "seed_deltas": deltas, "text": f"{reference} vs {other}: {label} {stat}: {text}."}


# ---- scoring -------------------------------------------------------------------------------------------

def _pooled_id(seed, row_id) -> str:
    return f"seed{seed}/{row_id}"


def _slice_bertscore(bs: dict, lo: int, hi: int) -> dict:
    if bs.get("status") != "ok":
        return bs
    return {k: (v[lo:hi] if k in ("precision", "recall", "f1") else v) for k, v in bs.items()}


def score_runs(systems: dict[str, list[str]], seeds: Sequence[int], tokenizer, *, bounds=DEFAULT_BOUNDS,
               meteor: bool = True, bertscore_model=None, bertscore_layers=None,
               n_resamples: int = stats.DEFAULT_RESAMPLES, boot_seed: int = stats.DEFAULT_SEED,
               dedup: bool = False) -> tuple[dict, dict, set[str]]:
    """(entries, per_row, tasks): each system's pooled entry (with `seeds`), its per-row values on pooled ids
    (a one-file system repeated for every seed) for `report.compare_systems`, and the tasks seen. BERTScore
    runs once over every system's rows (one model load; shared references embedded once)."""
    loaded = {}
    for name, files in systems.items():
        if len(files) not in (1, len(seeds)):
            raise InputError(f"--system {name}: {len(files)} files for {len(seeds)} seeds (give one per seed, "
                             "or one for a seed-independent system)")
        loaded[name] = [load_predictions(path, dedup) for path in files]
    flat = [r for runs in loaded.values() for run in runs for r in run]
    bs_all = bertscore_samples([r["prediction"] for r in flat], [r["reference"] for r in flat], bertscore_model,
                               num_layers=bertscore_layers, progress=True)
    entries, per_row, offset = {}, {}, 0
    for name, runs in loaded.items():
        rows = [r for run in runs for r in run]
        owner = [k for k, run in enumerate(runs) for _ in run]
        bs = _slice_bertscore(bs_all, offset, offset + len(rows))
        offset += len(rows)
        log.info("%s: scoring %d rows from %d file(s)", name, len(rows), len(runs))
        records = score_samples([r["prediction"] for r in rows], [r["reference"] for r in rows], tokenizer,
                                bounds=bounds, meteor=meteor, progress=True, desc=f"scoring {name}")
        entry = aggregate(records, bs, bounds=bounds, n_resamples=n_resamples, seed=boot_seed)
        per_seed = [aggregate(records, bs, [i for i, o in enumerate(owner) if o == k], bounds, n_resamples=0)
                    for k in range(len(runs))]
        entry["seeds"] = {"seeds": list(seeds) if len(runs) == len(seeds) else None,
                          "files": [str(f) for f in systems[name]], "metrics": across_seeds(per_seed)}
        entries[name] = {"file": ", ".join(str(f) for f in systems[name]), **entry}
        values = row_values(records, bs)
        if len(runs) == len(seeds):
            ids = [_pooled_id(seeds[o], r["id"]) for o, r in zip(owner, rows)]
        else:  # seed-independent: the same rows stand in for every seed
            ids = [_pooled_id(s, r["id"]) for s in seeds for r in rows]
            values = {k: np.concatenate([v] * len(seeds)) for k, v in values.items()}
        per_row[name] = {"ids": ids, **values}
    return entries, per_row, {str(r.get("task", "unknown")) for r in flat}


def build_report(entries: dict, per_row: dict, seeds: Sequence[int], reference: str | None, against: str | None,
                 *, tokenizer_name: str, bounds=DEFAULT_BOUNDS, n_resamples: int = stats.DEFAULT_RESAMPLES,
                 boot_seed: int = stats.DEFAULT_SEED, tasks: Sequence[str] = ()) -> dict:
    """evaluation.report's dict (pooled) plus the seeds, the readings and the headline `reading`."""
    report = {"scale": SCALE, "conventions": CONVENTIONS, "bounds": [0, *bounds], "segments": segment_names(bounds),
              "tokenizer": tokenizer_name, "tasks": sorted(tasks), "seeds": list(seeds), "systems": entries}
    comparisons = None
    if n_resamples:
        report["bootstrap"] = bootstrap_settings(n_resamples, boot_seed)
        if reference is not None and len(entries) > 1:
            comparisons = compare_systems(per_row, reference, n_resamples, boot_seed)
            report["comparisons"] = comparisons
    readings = []
    if reference is not None:
        pairs = {p["system"]: p for p in (comparisons or {}).get("pairs", [])}
        ref_seeds = entries[reference]["seeds"]["metrics"].get(HEADLINE_METRIC, {}).get("values", [])
        for name, entry in entries.items():
            oth_seeds = entry["seeds"]["metrics"].get(HEADLINE_METRIC, {}).get("values", [])
            if name == reference or not ref_seeds or not oth_seeds:
                continue
            readings.append(reading(reference, name, HEADLINE_METRIC,
                                    pairs.get(name, {}).get("metrics", {}).get(HEADLINE_METRIC), ref_seeds, oth_seeds))
    report["readings"] = readings
    others = [r["other"] for r in readings]
    if against is None:  # default: the first system trained with as many seeds as the reference
        n_ref = len(entries[reference]["seeds"]["metrics"].get(HEADLINE_METRIC, {}).get("values", [])) if reference else 0
        against = next((o for o in others if len(entries[o]["seeds"]["metrics"][HEADLINE_METRIC]["values"]) == n_ref
                        and n_ref > 1), others[0] if others else None)
    report["reading"] = next((r["text"] for r in readings if r["other"] == against), None)
    return report


def _seed_cell(entry: dict, metric: str) -> str:
    ci = (entry.get("ci") or {}).get(metric)
    v = _value(entry, metric)
    pooled = "n/a" if v is None else f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    s = entry["seeds"]["metrics"].get(metric)
    if s is None:
        return pooled
    spread = f"{s['mean']:.2f} ± {s['std']:.2f}" if s["std"] is not None else "one run"
    return f"{pooled}; {spread}"


def seeds_markdown(report: dict) -> str:
    """The across-seed section: pooled mean [per-row CI]; across-seed mean ± std, and the readings."""
    bs_label = bertscore_label(report)
    labels = {**LABELS, "bertscore": bs_label}
    seeds = ", ".join(str(s) for s in report["seeds"])
    out = ["## Across seeds", "",
           f"Seeds {seeds}: each seed sets the model initialisation, the data order and the sampling. Cell: "
           "mean over all rows of all seeds [95% bootstrap CI over rows]; mean ± sample std (ddof 1) of the "
           "per-seed values (`one run`: a seed-independent system, decoded once).", "",
           "| system | seeds | n | " + " | ".join(labels[c] for c in SEED_METRICS) + " |",
           "|---|---:|---:|" + "---:|" * len(SEED_METRICS)]
    for name, e in report["systems"].items():
        used = e["seeds"]["seeds"]
        out.append(f"| {name} | {len(used) if used else 1} | {e['n']} | "
                   + " | ".join(_seed_cell(e, c) for c in SEED_METRICS) + " |")
    if report["readings"]:
        out += ["", "Readings (rule-based: significant only if the paired CI excludes 0, p < 0.05 and every "
                "seed agrees in sign):", ""] + [f"- {r['text']}" for r in report["readings"]]
    return "\n".join(out) + "\n"


def full_markdown(report: dict) -> str:
    head, _, rest = markdown(report).partition("## Overall (Table 1 layout)")
    return head + seeds_markdown(report) + "\n## Overall, pooled over seeds (Table 1 layout)" + rest


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: score per-seed prediction files, write metrics.json/md and position.png, print the reading."""
    ap = argparse.ArgumentParser(prog="python -m evaluation.seeds", description=__doc__.split("\n")[0])
    ap.add_argument("--system", nargs="+", action="append", required=True, metavar="NAME_THEN_FILES",
                    help="a system name then its predictions, one file per seed (or one seed-independent file)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seed labels, in file order (default 1..k)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--reference-system", help="compared with every other (default: the first name with 'FlyThinker')")
    ap.add_argument("--against", help="the system of the headline reading (default: the first trained with "
                                      "as many seeds as the reference)")
    ap.add_argument("--tokenizer", help="generator tokenizer folder for position segments (default: tiny)")
    ap.add_argument("--bounds", nargs="+", type=int, default=list(DEFAULT_BOUNDS))
    ap.add_argument("--bertscore-model", default=DEFAULT_MODEL, help="'default', a local model folder, or none")
    ap.add_argument("--bertscore-layers", type=int)
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (no WordNet needed)")
    ap.add_argument("--dedup", action="store_true", help="keep the first row of a repeated id instead of failing")
    ap.add_argument("--bootstrap", type=int, default=stats.DEFAULT_RESAMPLES, help="resamples (0: none)")
    ap.add_argument("--seed", type=int, default=stats.DEFAULT_SEED, help="bootstrap seed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if any(len(s) < 2 for s in args.system):
            raise InputError("each --system needs a name and at least one predictions file")
        systems = {s[0]: s[1:] for s in args.system}
        if len(systems) != len(args.system):
            raise InputError("system names must be unique")
        n_seeds = max(len(f) for f in systems.values())
        seeds = args.seeds or list(range(1, n_seeds + 1))
        if len(seeds) != n_seeds or len(set(seeds)) != len(seeds):
            raise InputError(f"--seeds {seeds}: need {n_seeds} distinct labels (the most files of any system)")
        if args.bootstrap < 0:
            raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        reference = pick_reference(list(systems), args.reference_system)
        if args.against is not None and (args.against not in systems or args.against == reference):
            raise InputError(f"--against {args.against!r} must be one of the other systems")
        if not args.no_meteor:
            require_nltk_data()
        tokenizer = load_tokenizer(args.tokenizer)
        entries, per_row, tasks = score_runs(systems, seeds, tokenizer, bounds=tuple(args.bounds), meteor=not args.no_meteor,
                                      bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers,
                                      n_resamples=args.bootstrap, boot_seed=args.seed, dedup=args.dedup)
    except (InputError, MissingNltkData, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = build_report(entries, per_row, seeds, reference, args.against,
                          tokenizer_name=args.tokenizer or "flythinker_worker.tiny (tiny tokenizer)",
                          bounds=tuple(args.bounds), n_resamples=args.bootstrap, boot_seed=args.seed, tasks=tasks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "metrics.md").write_text(full_markdown(report), encoding="utf-8")
    plot_position(report, out / "position.png", METRICS, LABELS)
    log.info("wrote %s, %s, %s", out / "metrics.json", out / "metrics.md", out / "position.png")
    if report["reading"]:
        print(f"Reading: {report['reading']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
