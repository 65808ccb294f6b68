"""A sweep's points and folder: the search space, how points are named (Hydra overrides, folder names), the
folder's layout, and its results: one JSON line per trial, a Markdown table, PNG plots.

    python -m recipe.sweep_results checkpoints/flythinker/sweeps/lam     # any sweep folder, any time

Layout of `<sweep.storage_path>/<sweep.name>/` (recipe/sweep.py writes it):
    sweep.json                    the sweep's settings and command-line overrides (checked on resume)
    experiment_state-*.json, ...  Ray Tune's own state (Tuner.restore reads it)
    tune_<trial_id>/              Ray Tune's per-trial results (result.json) and checkpoints (pointers)
    trials/<overrides>/           each trial's training folder: metrics.jsonl, checkpoints/, final/, as
                                  launch/train.sh writes, plus sweep_trial.json (attempts, start, finish)
    results.jsonl, results.md, plots/*.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from flythinker_worker.config import check
from flythinker_worker.utils import write_json_atomic, write_text_atomic

DISTRIBUTIONS = ("grid_search", "choice", "uniform", "loguniform", "randint", "lograndint")
SETTINGS_FILE = "sweep.json"
TRIALS_DIR = "trials"
MARKER = "sweep_trial.json"
# Result keys Ray Tune fills in itself: not metrics of ours.
TUNE_KEYS = {"training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp",
             "date", "pid", "hostname", "node_ip", "config", "checkpoint_dir_name", "done", "trial_id",
             "experiment_tag", "iterations_since_restore", "should_checkpoint", "timesteps_total",
             "episodes_total", "timesteps_since_restore", "experiment_id"}


# ---- the search space (sweep.space) ------------------------------------------------------------------

def _is_distribution(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def flatten_space(space: dict, prefix: str = "") -> dict[str, Any]:
    """{"fusion": {"lam": [..]}} and {"fusion.lam": [..]} both give {"fusion.lam": [..]}."""
    out = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_distribution(value):
            inner = flatten_space(value, path + ".")
        else:
            inner = {path: value}
        for k in inner:
            check(k not in out, f"sweep.space.{k}", "is given twice")
        out.update(inner)
    return out


def _spec(key: str, spec) -> tuple[str, list]:
    """(distribution, its arguments), checked."""
    name, args = ("grid_search", spec) if isinstance(spec, list) else next(iter(spec.items())) \
        if _is_distribution(spec) else (None, None)
    where = f"sweep.space.{key}"
    check(name is not None, where, f"expected a list of values (a grid) or one of {{{'|'.join(DISTRIBUTIONS)}: "
          f"...}}, got {spec!r}")
    check(isinstance(args, list) and len(args) >= 1, where, f"{name} needs a non-empty list, got {args!r}")
    if name not in ("grid_search", "choice"):
        check(len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
              and args[0] < args[1], where, f"{name} needs [low, high] with low < high, got {args!r}")
        check(not name.startswith("log") or args[0] > 0, where, f"{name} needs low > 0, got {args!r}")
    return name, args


def tune_space(space: dict[str, Any]) -> dict:
    from ray import tune

    out = {}
    for key, spec in space.items():
        name, args = _spec(key, spec)
        out[key] = getattr(tune, name)(args) if name in ("grid_search", "choice") else getattr(tune, name)(*args)
    return out


def probe_points(space: dict[str, Any]) -> list[dict]:
    """Points that exercise every grid/choice value and both ends of every range (one key varied at a time):
    checked before any trial starts."""
    candidates = {}
    for key, spec in space.items():
        name, args = _spec(key, spec)
        candidates[key] = args if name in ("grid_search", "choice") else (
            [args[0], args[1] - 1] if name.endswith("randint") else list(args))
    first = {key: values[0] for key, values in candidates.items()}
    return [first] + [{**first, key: v} for key, values in candidates.items() for v in values[1:]]


def hydra_value(value) -> str:
    """A value in Hydra's override grammar (strings quoted unless they read as plain identifiers)."""
    if isinstance(value, str):
        plain = value.replace("_", "a").replace("-", "a").replace(".", "a").replace("/", "a")
        if value and value[0].isalpha() and plain.isalnum() and value.lower() not in ("true", "false", "null",
                                                                                        "inf", "nan"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return format_value(value)


# ---- layout -----------------------------------------------------------------------------------------------

def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def point_name(config: dict, trial_id: str | None = None) -> str:
    """A trial's folder name: its overrides as Hydra's override_dirname writes them (`fusion.lam=0.5`,
    keys sorted, `,` between), plus `trial=<id>` when num_samples > 1 may repeat a point."""
    parts = [f"{key}={format_value(config[key])}" for key in sorted(config)]
    if trial_id is not None:
        parts.append(f"trial={trial_id}")
    return ",".join(parts).replace("/", "_") or "default"


def trial_folder(sweep_dir, config: dict, trial_id: str, num_samples: int) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / point_name(config, trial_id if num_samples > 1 else None)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data) -> None:
    """Atomically (temp file, then rename): a reader never sees half a file."""
    write_json_atomic(path, data, indent=1, allow_nan=False, default=str)


def update_marker(folder: Path, **changes) -> dict:
    """Merge `changes` into the trial folder's sweep_trial.json (one writer: the trial itself)."""
    marker = read_json(Path(folder) / MARKER) or {}
    marker.update(changes)
    write_json(Path(folder) / MARKER, marker)
    return marker


# ---- results ----------------------------------------------------------------------------------------------

def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON; the table shows it as "-"
    return value


def _metrics(result: dict | None) -> dict | None:
    if not result:
        return None
    return {k: _clean(v) for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float, str, type(None)))}


def _results_of(trial_path: str | None) -> list[dict]:
    path = Path(trial_path or "") / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _best(results: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in results if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return results[-1] if results else None
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric])


def collect(sweep_dir) -> tuple[dict, list[dict]]:
    """(sweep.json, one record per trial) from a sweep folder, finished or not."""
    from ray.tune import ExperimentAnalysis

    sweep_dir = Path(sweep_dir).resolve()
    settings = read_json(sweep_dir / SETTINGS_FILE)
    if settings is None:
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder (no {SETTINGS_FILE}; made by recipe/sweep.py)")
    metric, mode = settings["settings"]["metric"], settings["settings"]["mode"]
    records = []
    for trial in ExperimentAnalysis(str(sweep_dir)).trials:
        config = dict(trial.config)
        folder = trial_folder(sweep_dir, config, trial.trial_id, settings["settings"]["num_samples"])
        marker = read_json(folder / MARKER) or {}
        results = _results_of(trial.path)
        last = results[-1] if results else None
        status = trial.status
        if status == "TERMINATED" and not marker.get("finished_at"):
            status = "STOPPED"  # ended by the scheduler (e.g. ASHA) before its last step
        started = marker.get("started_at") or getattr(trial.run_metadata, "start_time", None)
        ended = (marker.get("attempts") or [{}])[-1].get("ended_at")
        finished = marker.get("finished_at") or ended or marker.get("updated_at") or (last or {}).get("timestamp")
        records.append({
            "trial_id": trial.trial_id, "status": status, "config": config,
            "started_at": started, "finished_at": finished if status != "RUNNING" else None,
            "num_failures": trial.num_failures, "folder": str(folder),
            "last": _metrics(last), "best": _metrics(_best(results, metric, mode)),
        })
    sign = 1 if mode == "min" else -1

    def rank(record):
        value = (record["best"] or {}).get(metric)
        return (value is None, sign * value if value is not None else 0.0, record["trial_id"])

    records.sort(key=rank)
    return settings, records


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(settings: dict, records: list[dict]) -> str:
    metric = settings["settings"]["metric"]
    keys = sorted({k for r in records for k in r["config"]})
    head = ["#", "trial", "status", *keys, f"best {metric}", "val_loss", "train_loss", "step", "failures",
            "minutes"]
    lines = [f"# Sweep `{settings['settings']['name']}`: {len(records)} trials, sorted by {metric} "
             f"({settings['settings']['mode']})", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for i, r in enumerate(records, 1):
        last, best = r["last"] or {}, r["best"] or {}
        minutes = ((r["finished_at"] - r["started_at"]) / 60 if r["finished_at"] and r["started_at"] else None)
        row = [i, r["trial_id"], r["status"], *(format_value(r["config"].get(k)) for k in keys), best.get(metric),
               last.get("val_loss"), last.get("train_loss"), last.get("step"), r["num_failures"], minutes]
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    lines += ["", "Training folders (metrics.jsonl, checkpoints/, final/): `trials/<overrides>/`; STOPPED trials "
              "were ended early by the scheduler and keep their checkpoints but no final/."]
    return "\n".join(lines) + "\n"


def plot(settings: dict, records: list[dict], out_dir: Path) -> list[Path]:
    """PNGs: the metric against each swept key, and the learning curves (train and val loss) of all trials.
    matplotlib is imported here only: the training path never loads it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    metric, written = settings["settings"]["metric"], []
    for key in sorted({k for r in records for k in r["config"]}):
        points = [(r["config"].get(key), (r["best"] or {}).get(metric), r["status"]) for r in records]
        points = [p for p in points if p[1] is not None]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for p in points)
        xs = [p[0] if numeric else format_value(p[0]) for p in points]
        for status, marker in (("TERMINATED", "o"), ("STOPPED", "x"), ("ERROR", "s"), ("RUNNING", "^")):
            sel = [(x, p[1]) for x, p in zip(xs, points) if p[2] == status]
            if sel:
                ax.scatter(*zip(*sel), marker=marker, label=status.lower())
        if numeric and len({p[0] for p in points}) > 1 and min(p[0] for p in points) > 0 \
                and max(p[0] for p in points) / min(p[0] for p in points) > 100:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in records:
        rows = _metrics_jsonl(Path(r["folder"]))
        label = point_name(r["config"]) + ("" if r["status"] == "TERMINATED" else f" ({r['status'].lower()})")
        line, = train_ax.plot([x["step"] for x in rows if "loss" in x], [x["loss"] for x in rows if "loss" in x],
                              label=label, lw=1)
        val = [x for x in rows if isinstance(x.get("val_loss"), (int, float))]
        val_ax.plot([x["step"] for x in val], [x["val_loss"] for x in val], marker="o", color=line.get_color(),
                    label=label, lw=1)
    for ax, name in ((train_ax, "train loss"), (val_ax, "val loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
    if val_ax.get_legend_handles_labels()[0]:
        val_ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "learning_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return written + [path]


def _metrics_jsonl(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def write_results(sweep_dir) -> dict[str, Path]:
    """results.jsonl, results.md and plots/ in the sweep folder; returns their paths."""
    sweep_dir = Path(sweep_dir).resolve()
    settings, records = collect(sweep_dir)
    jsonl = sweep_dir / "results.jsonl"
    write_text_atomic(jsonl, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    md = sweep_dir / "results.md"
    write_text_atomic(md, table(settings, records))
    plots = plot(settings, records, sweep_dir / "plots")
    return {"results.jsonl": jsonl, "results.md": md, **{p.name: p for p in plots}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write results.jsonl, results.md and plots/ of a sweep folder.")
    parser.add_argument("sweep_dir", help="<sweep.storage_path>/<sweep.name>, e.g. checkpoints/flythinker/sweeps/lam")
    args = parser.parse_args(argv)
    start = time.time()
    paths = write_results(args.sweep_dir)
    print(f"[sweep] results of {args.sweep_dir} ({time.time() - start:.1f} s):")
    for path in paths.values():
        print(f"  {path}")


if __name__ == "__main__":
    main()
