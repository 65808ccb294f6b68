"""Hyperparameter sweeps on Ray Tune, in the current Ray cluster (or a private local one).

    bash launch/sweep.sh +sweep=lam [overrides]      # = python -m recipe.sweep +sweep=lam [overrides]

A sweep config (configs/sweep/*.yaml) holds `sweep.space` and settings with Ray Tune's names (SweepSettings);
comma lists on the command line sweep too (`fusion.lam=0.5,1.0`). A trial is one training run
(recipe.main_flythinker.run) of the command line's overrides plus its point, in `trials/<overrides>/`; its
workers live in the trial's placement group (a bundle for the trial driver, one per worker), so Tune packs
trials onto the cluster and frees their workers with them. Trials report at validation steps with a Tune
checkpoint pointing at the training checkpoint; a retried trial resumes from its own folder. Rerunning the
same command resumes the sweep (Tuner.restore): finished trials never run again, unfinished ones continue,
and trials that ended in ERROR (their retries spent) get new attempts, each from its last checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from flythinker_worker.config import build, check

from . import checkpointing
from .sweep_results import (MARKER, SETTINGS_FILE, flatten_space, hydra_value, probe_points, read_json,
                            trial_folder, tune_space, update_marker, write_json, write_results)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class SweepSettings:
    """The `sweep:` section. Names are Ray Tune's (TuneConfig, RunConfig, FailureConfig, ASHAScheduler)."""

    name: str = ""  # "": the sweep config's name (+sweep=<name>)
    space: dict = field(default_factory=dict)  # {key: [grid values] | {distribution: args}}, nested or dotted
    num_samples: int = 1
    max_concurrent_trials: int | None = None  # None: as many as fit
    max_failures: int = 2  # retries per trial, each from its last checkpoint
    storage_path: str | None = None  # None: checkpoints/<trainer.project_name>/sweeps
    metric: str = "val_loss"  # any reported key: val_loss, train_loss (mean since the last report), ...
    mode: str = "min"
    scheduler: str = "fifo"  # fifo | asha
    grace_period: int = 1  # asha: training steps before a trial can be stopped
    reduction_factor: float = 4.0  # asha
    max_t: int | None = None  # asha: steps; None: trainer.total_training_steps (or unbounded)
    seed: int | None = 0  # draws of the random keys (uniform, choice, ...); None: a fresh draw every sweep

    def __post_init__(self):
        check(self.num_samples >= 1, "sweep.num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1, "sweep.max_concurrent_trials",
              f"must be >= 1 or null (as many as fit), got {self.max_concurrent_trials}")
        check(self.max_failures >= -1, "sweep.max_failures",
              f"must be >= 0 (or -1: unlimited), got {self.max_failures}")
        check(self.mode in ("min", "max"), "sweep.mode", f"must be min or max, got {self.mode!r}")
        check(self.scheduler in ("fifo", "asha"), "sweep.scheduler", f"must be fifo or asha, got {self.scheduler!r}")
        check(self.grace_period >= 1, "sweep.grace_period", f"must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, "sweep.reduction_factor", f"must be > 1, got {self.reduction_factor}")
        check(self.max_t is None or self.max_t >= self.grace_period, "sweep.max_t", "must be >= sweep.grace_period")
        check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "sweep.seed",
              f"must be an int >= 0 or null, got {self.seed!r}")


def search_algorithm(settings: SweepSettings):
    """Ray Tune's default variant generator, seeded (the same sweep draws the same points) and holding the
    concurrency limit itself (Tune ignores max_concurrent_trials beside an explicit generator)."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=settings.max_concurrent_trials or 0, random_state=settings.seed)


# ---- configs ----------------------------------------------------------------------------------------------

def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def parse_argv(argv: list[str]) -> tuple[list[str], dict[str, list]]:
    """(plain overrides, comma-list sweeps from the command line as grid lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    base, cli_space = [], {}
    for override in OverridesParser.create().parse_overrides([a for a in argv if a not in ("-m", "--multirun")]):
        if override.is_sweep_override():
            check(override.is_choice_sweep(), override.get_key_element(),
                  "only comma lists (a,b,c) sweep on the command line; put ranges in sweep.space")
            cli_space[_key(override.get_key_element())] = list(override.sweep_iterator())
        else:
            base.append(override.input_line)
    return base, cli_space


def compose_tree(overrides: list[str]) -> dict:
    """The config as launch/train.sh composes it for these overrides, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return OmegaConf.to_container(compose(config_name="flythinker_trainer", overrides=list(overrides)),
                                      resolve=True)


def trial_tree(base: list[str], point: dict, folder: Path | None = None, name: str = "") -> dict:
    """The training config of one point (its `sweep` section dropped), writing to `folder`."""
    overrides = base + [f"{key}={hydra_value(value)}" for key, value in sorted(point.items())]
    try:
        tree = compose_tree(overrides)
    except Exception as err:  # Hydra's message names the key; say which point made it
        raise ValueError(f"sweep point {point}: {err}") from None
    tree.pop("sweep", None)
    if folder is not None:
        tree["trainer"]["default_local_dir"] = str(folder)
        tree["trainer"]["experiment_name"] = f"{name}/{folder.name}"
    return tree


def trial_resources(cfg):
    """The trial's PlacementGroupFactory: one CPU for the trial driver, then one bundle per worker shaped as
    recipe.workers.make_worker_group asks (a GPU, or a CPU; two processes each with validation generation)."""
    from ray.tune import PlacementGroupFactory

    t = cfg.trainer
    check(t.nnodes == 1, "trainer.nnodes", "a sweep trial runs on one node (its workers share one placement "
          "group); run multi-node points with launch/train.sh")
    colocate = 2 if cfg.val_generation.num_samples > 0 and cfg.data.val_files else 1
    worker = {"CPU": colocate, **({"GPU": 1} if t.device == "cuda" else {})}
    return PlacementGroupFactory([{"CPU": 1}] + [dict(worker) for _ in range(t.n_gpus_per_node)],
                                 strategy="STRICT_PACK")


def _resources_of(base: list[str], config: dict):
    from .config import load_config

    return trial_resources(load_config(trial_tree(base, dict(config))))


@dataclass
class Sweep:
    settings: SweepSettings
    base: list[str]  # command-line overrides (those of the sweep config included via +sweep=...)
    space: dict[str, Any]  # flattened, command-line comma lists merged in
    directory: Path  # <storage_path>/<name>
    cfg: Any  # the training config of the first point (recipe.config.FlyThinkerConfig)


def prepare(argv: list[str]) -> Sweep:
    """Parse and check everything a sweep needs before Ray starts: settings, space, every probe point's
    training config and paths. Errors name the key."""
    from .config import check_sources, load_config

    base, cli_space = parse_argv(argv)
    tree = compose_tree(base)
    check("sweep" in tree or bool(cli_space), "sweep", "no sweep given: pass +sweep=<name> (configs/sweep/) or "
          "comma lists (fusion.lam=0.5,1.0)")
    settings = build(SweepSettings, tree.get("sweep") or {}, "sweep")
    space = {**flatten_space(settings.space), **cli_space}
    check(bool(space), "sweep.space", "is empty: nothing to sweep")
    for override in base:
        check(_key(override) not in space, _key(override), f"is swept (sweep.space) and also set by `{override}`; "
              "drop one")
    group = next((o.split("=", 1)[1] for o in base if _key(o) == "sweep"), None)
    settings.name = settings.name or group or ",".join(sorted(space))
    cfg = load_config(trial_tree(base, probe_points(space)[0]))
    settings.storage_path = str(Path(settings.storage_path or f"checkpoints/{cfg.trainer.project_name}/sweeps")
                                .resolve())
    if "runtime_resources" in settings.storage_path:  # `ray job submit --working-dir`: a per-job copy
        print(f"[sweep] WARNING: sweep.storage_path is {settings.storage_path}, inside this job's uploaded working "
              "dir: trials on other nodes and a resubmitted job will not find it; set sweep.storage_path to a "
              "shared filesystem path", flush=True)
    for point in probe_points(space):
        point_cfg = load_config(trial_tree(base, point))
        check_sources(point_cfg)
        check(point_cfg.trainer.resume_mode == "auto", "trainer.resume_mode",
              "must be auto in a sweep: retried trials resume from their own folders")
        if settings.metric.startswith("val_"):
            check(bool(point_cfg.data.val_files), "sweep.metric", f"{settings.metric} needs data.val_files")
        if settings.scheduler == "asha":
            check(point_cfg.trainer.test_freq > 0 or not settings.metric.startswith("val_"), "trainer.test_freq",
                  "must be > 0 with sweep.scheduler=asha: trials are compared at intermediate validations")
        trial_resources(point_cfg)
    return Sweep(settings, base, space, Path(settings.storage_path) / settings.name, cfg)


# ---- inside a trial ---------------------------------------------------------------------------------------

class _Reporter:
    """The trainer's on_step hook: tune.report at every step that has the metric (validation steps for
    val_loss), with a Tune checkpoint pointing at the newest training checkpoint. The last step is reported
    after the trainer has written final/, so a scheduler stopping it there cannot cut the export short."""

    def __init__(self, settings: dict, folder: Path, hook: Callable | None):
        self.metric, self.mode, self.folder, self.hook = settings["metric"], settings["mode"], folder, hook
        self.losses, self.checkpoint, self.pending = [], None, None

    def __call__(self, step: int, total_steps: int, metrics: dict, checkpoint: str | None) -> None:
        if "loss" in metrics:
            self.losses.append(metrics["loss"])
        if checkpoint is not None:
            self.checkpoint = (step, checkpoint)
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "loss"}
        if self.losses:
            result["train_loss"] = sum(self.losses) / len(self.losses)
        result["step"] = step
        if self.metric in result:
            if not math.isfinite(result[self.metric]):  # a diverged trial ranks last (ASHA skips NaN)
                result[self.metric] = math.inf if self.mode == "min" else -math.inf
            self.losses = []
            if step >= total_steps:
                self.pending = result
            else:
                self._report(result)
        if self.hook is not None:
            self.hook(self.folder, step, metrics)

    def _report(self, result: dict) -> None:
        from ray import tune

        update_marker(self.folder, updated_at=time.time(), last_step=result["step"])
        if self.checkpoint is None:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory() as tmp:
            step, path = self.checkpoint
            write_json(Path(tmp) / "training_checkpoint.json",
                       {"training_dir": str(self.folder), "checkpoint": path, "step": step})
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))
        self.checkpoint = None

    def finish(self) -> None:
        if self.pending is not None:
            self._report(self.pending)
            self.pending = None

    def replay(self) -> None:
        """A trial whose training had finished (the sweep driver died before Tune recorded it): report its
        recorded results instead of training again."""
        rows = [json.loads(line) for line in (self.folder / "metrics.jsonl").read_text().splitlines()
                if line.endswith("}")]
        for row in rows:
            self(row["step"], rows[-1]["step"], row, None)
        self.finish()


def train_trial(config: dict, *, setup: dict, trial_hook: Callable | None = None) -> None:
    """Ray Tune's function trainable: the trial's driver. Retried by Tune after a failure; the training run
    resumes from the newest checkpoint in the trial's own folder (trainer.resume_mode=auto)."""
    from ray import tune

    from .main_flythinker import run

    point, trial_id = dict(config), tune.get_context().get_trial_id()
    folder = trial_folder(setup["directory"], point, trial_id, setup["settings"]["num_samples"])
    folder.mkdir(parents=True, exist_ok=True)
    marker = read_json(folder / MARKER) or {}
    reporter = _Reporter(setup["settings"], folder, trial_hook)
    if marker.get("finished_at") and (folder / "final").is_dir():
        update_marker(folder, replayed_at=time.time())
        reporter.replay()
        return
    pointer = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as path:
            pointer = read_json(Path(path) / "training_checkpoint.json")
    latest = checkpointing.latest(checkpointing.checkpoint_root(str(folder)))
    attempts = marker.get("attempts", []) + [{
        "started_at": time.time(), "tune_checkpoint_step": (pointer or {}).get("step"),
        "resume_step": checkpointing.read_driver_state(latest)["step"] if latest else 0}]
    update_marker(folder, trial_id=trial_id, config=point, started_at=marker.get("started_at") or time.time(),
                  attempts=attempts)
    print(f"[sweep] trial {trial_id} {point} -> {folder} (attempt {len(attempts)}, from step "
          f"{attempts[-1]['resume_step']})", flush=True)
    tree = trial_tree(setup["base"], point, folder, setup["settings"]["name"])
    try:
        run(tree, on_step=reporter)  # its worker groups take the trial's bundles (recipe.workers)
    except SystemExit:  # Tune ended the trial (a scheduler's stop, or the sweep's end)
        attempts[-1].update(ended_at=time.time(), stopped=True)
        update_marker(folder, attempts=attempts)
        raise
    except BaseException as err:
        attempts[-1].update(ended_at=time.time(), error=f"{type(err).__name__}: {err}"[:1000])
        update_marker(folder, attempts=attempts)
        raise
    attempts[-1]["ended_at"] = time.time()
    update_marker(folder, attempts=attempts, finished_at=attempts[-1]["ended_at"])
    reporter.finish()


def _tune_dirname(trial) -> str:
    return f"tune_{trial.trial_id}"


# ---- the driver -------------------------------------------------------------------------------------------

def run_sweep(argv: list[str], trial_hook: Callable | None = None) -> Path:
    """Run (or resume) the sweep; writes its results; returns the sweep folder. `trial_hook(folder, step,
    metrics)` runs inside each trial after every step (probes, fault-injection tests); it must pickle."""
    sweep = prepare(argv)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .workers import init_ray

    s, directory = sweep.settings, sweep.directory
    record = {"settings": asdict(s), "overrides": sweep.base, "space": sweep.space}
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials read relative paths as the driver does
    init_ray(sweep.cfg.trainer.device)
    setup = {"settings": record["settings"], "base": sweep.base, "directory": str(directory)}
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup, trial_hook=trial_hook),
                                    resources=functools.partial(_resources_of, sweep.base))
    if tune.Tuner.can_restore(str(directory)):
        before = read_json(directory / SETTINGS_FILE) or {}
        # A settings key the sweep's record lacks (written before the key existed) had its default then.
        before["settings"] = {**asdict(SweepSettings()), **before.get("settings", {})}
        if {k: before.get(k) for k in record} != json.loads(json.dumps(record)):
            raise ValueError(f"{directory} holds a sweep started with other settings ({before.get('overrides')}, "
                             f"space {before.get('space')}): rerun that command to resume it, or give this sweep "
                             "its own sweep.name")
        print(f"[sweep] resuming {directory}", flush=True)
        # resume_errored: an ERROR trial (e.g. a node lost after its retries were spent) continues from its
        # last checkpoint, with a fresh max_failures; restart_errored would throw its progress away.
        tuner = tune.Tuner.restore(str(directory), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / SETTINGS_FILE, record)
        max_t = s.max_t or sweep.cfg.trainer.total_training_steps or 10**9
        scheduler = ASHAScheduler(time_attr="step", grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                                  max_t=max_t) if s.scheduler == "asha" else FIFOScheduler()
        tuner = tune.Tuner(
            trainable, param_space=tune_space(sweep.space),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                                        search_alg=search_algorithm(s), trial_dirname_creator=_tune_dirname),
            run_config=tune.RunConfig(name=s.name, storage_path=s.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    print(f"[sweep] {s.name}: space {sweep.space}, {s.num_samples} sample(s), scheduler {s.scheduler}, "
          f"folder {directory}", flush=True)
    grid = tuner.fit()
    paths = write_results(directory)
    print(f"[sweep] {len(grid)} trials, {len(grid.errors)} failed; results: {paths['results.md']}", flush=True)
    print(paths["results.md"].read_text(), flush=True)
    return directory


def main(argv: list[str] | None = None, trial_hook: Callable | None = None) -> int:
    """The command line (launch/sweep.sh): exit status 1 when a trial ended in ERROR."""
    directory = run_sweep(sys.argv[1:] if argv is None else argv, trial_hook)
    rows = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]
    return 1 if any(r["status"] == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
