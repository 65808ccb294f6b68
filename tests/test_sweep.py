"""Sweeps on Ray Tune (recipe/sweep.py) with the tiny pair on CPU: a 4-point lam sweep runs two trials at a
time, a trial whose training worker is killed is retried from its checkpoint, the sweep driver killed with
SIGKILL and rerun finishes without rerunning finished trials, ASHA stops a diverging trial early, and the
results table and plots are written, and a trial that ended in ERROR is resumed by a rerun. Plus the quick
checks of sweep configs (no Ray)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from recipe import sweep
from recipe.sweep_results import MARKER, point_name, trial_folder

pytestmark = pytest.mark.slow
BIN = str(Path(sys.executable).parent)
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# 4 steps, validation and checkpoints every 2; one worker per trial (bundles: driver CPU + worker CPU).
TRIAL = ["trainer.total_training_steps=4", "trainer.test_freq=2", "trainer.save_freq=2",
         "trainer.n_gpus_per_node=1", "val_generation.num_samples=0"]

# The sweep driver as launch/sweep.sh runs it, plus a trial hook that kills one training worker of the
# fusion.lam=0.25 trial right after its step-2 report (once: a flag file remembers it).
DRIVER = '''
import sys
from pathlib import Path

from recipe import sweep

FLAG = Path(sys.argv[1])


def kill_worker_once(folder, step, metrics):
    import ray

    if Path(folder).name != "fusion.lam=0.25" or step != 2 or FLAG.exists():
        return
    # recipe.workers names a trial's workers after the trial's placement group.
    prefix = f"pg{ray.util.get_current_placement_group().id.hex()[:8]}_"
    names = [n for n in ray.util.list_named_actors() if n.startswith(prefix) and "TrainWorker" in n]
    FLAG.write_text(" ".join(names))
    ray.kill(ray.get_actor(names[0]))


sys.exit(sweep.main(sys.argv[2:], trial_hook=kill_worker_once))
'''


def assets_overrides(assets):
    return [f"model.generator.path={assets}/tiny_models/generator",
            f"model.reasoner.path={assets}/tiny_models/reasoner",
            f"data.train_files=[{assets}/product_review/train.parquet]",
            f"data.val_files=[{assets}/product_review/val.parquet]", *TRIAL]


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tune_statuses(directory):
    """{trial_id: status} from Ray Tune's saved experiment state (what a restore would see)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(directory)).trials}
    except Exception:  # not written yet, or being replaced
        return {}


def test_lam_sweep_concurrent_retried_resumed_with_results(tiny_assets, tmp_path):
    storage, flag = tmp_path / "sweeps", tmp_path / "killed_worker"
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(flag), "+sweep=lam", *assets_overrides(tiny_assets),
           "sweep.max_concurrent_trials=2", f"sweep.storage_path={storage}"]
    directory = storage / "lam"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Kill the driver once Tune has recorded two finished trials and the others are still to finish.
        deadline = time.time() + 420
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, (tmp_path / "first.log").read_text()[-5000:]
            statuses = tune_statuses(directory)
            if list(statuses.values()).count("TERMINATED") >= 2:
                break
            time.sleep(1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert flag.exists(), "the worker-kill hook never ran"
    done = {tid for tid, status in statuses.items() if status == "TERMINATED"}
    assert len(statuses) == 4 and len(done) < 4, statuses
    before = {}
    for folder in (directory / "trials").iterdir():
        marker = json.loads((folder / MARKER).read_text())
        if marker["trial_id"] in done:
            before[marker["trial_id"]] = (marker, (folder / "metrics.jsonl").read_text(),
                                          (folder / "final").stat().st_mtime_ns)

    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=420)
    assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-5000:]
    assert "resuming" in rerun.stdout

    results = {r["config"]["fusion.lam"]: r for r in lines(directory / "results.jsonl")}
    assert sorted(results) == [0.25, 0.5, 1.0, 2.0]
    for lam, r in results.items():
        assert r["status"] == "TERMINATED", r
        assert set(r) >= {"trial_id", "status", "config", "started_at", "finished_at", "num_failures", "last", "best"}
        assert r["last"]["step"] == 4 and r["last"]["val_loss"] > 0 and r["best"]["val_loss"] > 0
        folder = directory / "trials" / point_name({"fusion.lam": lam})
        assert [m["step"] for m in lines(folder / "metrics.jsonl")] == [1, 2, 3, 4]
        assert (folder / "final" / "flythinker.json").exists() and (folder / "checkpoints" / "global_step_4").is_dir()
    # Finished trials were not run again: same records, same export, one attempt, no replay.
    for trial_id, (marker, metrics, final_mtime) in before.items():
        r = next(r for r in results.values() if r["trial_id"] == trial_id)
        folder = Path(r["folder"])
        assert json.loads((folder / MARKER).read_text())["attempts"] == marker["attempts"]
        assert (folder / "metrics.jsonl").read_text() == metrics
        assert (folder / "final").stat().st_mtime_ns == final_mtime
    # The killed worker: the trial failed once and its second attempt resumed from the step-2 checkpoint.
    killed = results[0.25]
    assert killed["num_failures"] == 1
    attempts = json.loads((Path(killed["folder"]) / MARKER).read_text())["attempts"]
    assert "ActorDied" in attempts[0]["error"] and attempts[0]["resume_step"] == 0
    assert (attempts[1]["resume_step"], attempts[1]["tune_checkpoint_step"]) == (2, 2)
    # Two trials at a time: the first two overlap, never three at once.
    spans = sorted((r["started_at"], r["finished_at"]) for r in results.values())
    assert spans[0][1] > spans[1][0], spans
    for start, _ in spans:
        assert sum(s <= start < f for s, f in spans) <= 2, spans
    # The table (sorted by val_loss) and the plots.
    table = (directory / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "TERMINATED" in line]
    best = [float(line.split("|")[5]) for line in rows]
    assert len(rows) == 4 and best == sorted(best), table
    for name in ("learning_curves.png", "val_loss_vs_fusion.lam.png"):
        assert (directory / "plots" / name).stat().st_size > 5000


def test_asha_stops_a_diverging_trial(ray_local, tiny_assets, tmp_path):
    directory = sweep.run_sweep(["+sweep=lr", "optim.lr=0.002,50.0", *assets_overrides(tiny_assets),
                                 "sweep.num_samples=1", "sweep.max_concurrent_trials=1", "sweep.grace_period=2",
                                 "sweep.reduction_factor=2", f"sweep.storage_path={tmp_path}"])
    results = {r["config"]["optim.lr"]: r for r in lines(directory / "results.jsonl")}
    good, bad = results[0.002], results[50.0]
    assert good["status"] == "TERMINATED" and good["last"]["step"] == 4
    assert bad["status"] == "STOPPED" and bad["last"]["step"] == 2, bad
    assert bad["last"]["val_loss"] is None or bad["last"]["val_loss"] > good["best"]["val_loss"] + 1
    assert not (Path(bad["folder"]) / "final").exists() and (Path(good["folder"]) / "final").is_dir()
    assert max(m["step"] for m in lines(Path(bad["folder"]) / "metrics.jsonl")) < 4
    table = (directory / "results.md").read_text()
    assert table.index("0.002") < table.index("STOPPED")  # the stopped trial ranks last
    assert (directory / "plots" / "val_loss_vs_optim.lr.png").exists()


def test_rerun_resumes_a_trial_that_ended_in_error(ray_local, tiny_assets, tmp_path):
    """With no retries left (max_failures 0) a trial whose step 2 raises ends in ERROR and the sweep exits 1;
    once the cause is gone, rerunning the same command continues that trial from its step-2 checkpoint and
    leaves the finished one alone."""
    flag = tmp_path / "broken"
    flag.write_text("x")
    flag_path = str(flag)

    def fail_while_flagged(folder, step, metrics):  # a closure: pickled by value into the trial
        if Path(folder).name == "fusion.lam=1.0" and step == 2 and Path(flag_path).exists():
            raise RuntimeError("injected failure")

    argv = ["+sweep=lam", "sweep.space.fusion.lam=[0.5,1.0]", *assets_overrides(tiny_assets), "sweep.max_failures=0",
            "sweep.max_concurrent_trials=1", f"sweep.storage_path={tmp_path / 'sweeps'}"]
    assert sweep.main(argv, trial_hook=fail_while_flagged) == 1
    directory = tmp_path / "sweeps" / "lam"
    first = {r["config"]["fusion.lam"]: r for r in lines(directory / "results.jsonl")}
    assert (first[1.0]["status"], first[0.5]["status"]) == ("ERROR", "TERMINATED"), first
    finished_metrics = (Path(first[0.5]["folder"]) / "metrics.jsonl").read_text()

    flag.unlink()
    assert sweep.main(argv, trial_hook=fail_while_flagged) == 0
    second = {r["config"]["fusion.lam"]: r for r in lines(directory / "results.jsonl")}
    assert second[1.0]["status"] == "TERMINATED" and second[1.0]["last"]["step"] == 4, second[1.0]
    folder = Path(second[1.0]["folder"])
    assert [m["step"] for m in lines(folder / "metrics.jsonl")] == [1, 2, 3, 4]
    attempts = json.loads((folder / MARKER).read_text())["attempts"]
    assert "injected failure" in attempts[0]["error"] and attempts[-1]["resume_step"] == 2, attempts
    assert (Path(second[0.5]["folder"]) / "metrics.jsonl").read_text() == finished_metrics


@pytest.mark.parametrize("argv, message", [
    (["+sweep=lam", "fusion.lam=1.0"], "fusion.lam: is swept"),
    (["+sweep=lam", "sweep.scheduler=pbt"], "sweep.scheduler: must be fifo or asha"),
    (["+sweep=lam", "+sweep.space.fusion.lamm=[1,2]"], "fusion.lamm"),
    (["+sweep=lr", "sweep.space.optim.lr.loguniform=[1e-2,1e-4]"], "needs \\[low, high\\] with low < high"),
    (["+sweep=positions", "trainer.test_freq=-1", "sweep.scheduler=asha"], "trainer.test_freq: must be > 0"),
    (["+sweep=lam", "trainer.nnodes=2"], "trainer.nnodes: a sweep trial runs on one node"),
    ([], "no sweep given"),
])
def test_bad_sweeps_fail_before_ray_starts(tiny_assets, argv, message):
    with pytest.raises(Exception, match=message):
        sweep.prepare(assets_overrides(tiny_assets) + argv)


def test_sweep_configs_parse(tiny_assets):
    spaces = {name: sweep.prepare([f"+sweep={name}", *assets_overrides(tiny_assets)]).space
              for name in ("lam", "positions", "baselines")}
    assert spaces == {"lam": {"fusion.lam": [0.25, 0.5, 1.0, 2.0]},
                      "positions": {"fusion.positions": ["global", "input_only", "output_only"]},
                      "baselines": {"method": ["flythinker", "sft"]}}
    cli = sweep.prepare(["fusion.lam=0.5,1.0", *assets_overrides(tiny_assets)])
    assert (cli.settings.name, cli.space) == ("fusion.lam", {"fusion.lam": [0.5, 1.0]})
    assert sweep.probe_points({"a": [1, 2], "b": {"loguniform": [1e-4, 1e-2]}}) == [
        {"a": 1, "b": 1e-4}, {"a": 2, "b": 1e-4}, {"a": 1, "b": 1e-2}]
    assert [sweep.hydra_value(v) for v in (0.25, "qwen2.5-3b-1.5b", "a b", "true", None, [1, "x"])] == [
        "0.25", "qwen2.5-3b-1.5b", "'a b'", "'true'", "null", "[1,x]"]
    assert point_name({"optim.lr": 1e-05, "fusion.lam": 0.5}) == "fusion.lam=0.5,optim.lr=1e-05"
    # num_samples > 1 may draw a point twice: its trials get their own folders.
    assert trial_folder("/s", {"method": "sft"}, "ab_00001", 1) == Path("/s/trials/method=sft")
    assert trial_folder("/s", {"method": "sft"}, "ab_00001", 3) == Path("/s/trials/method=sft,trial=ab_00001")


def test_random_keys_are_drawn_from_the_seed(tiny_assets):
    """The lr sweep's log-uniform draws (through the generator run_sweep gives Tune) repeat for the same
    sweep.seed, change with another, and stay in the configured range; no cluster needed."""
    from ray.tune.search import BasicVariantGenerator

    def draws(*overrides):
        prepared = sweep.prepare(["+sweep=lr", "sweep.num_samples=5", *assets_overrides(tiny_assets), *overrides])
        generator = sweep.search_algorithm(prepared.settings)
        assert isinstance(generator, BasicVariantGenerator)
        generator.add_configurations({"lr": {"run": lambda config: None, "num_samples": 5,
                                             "config": sweep.tune_space(prepared.space)}})
        trials = iter(generator.next_trial, None)
        return [trial.config["optim.lr"] for trial in trials]

    first = draws()
    assert len(first) == 5 and len(set(first)) == 5 and all(1e-6 <= lr <= 1e-4 for lr in first)
    assert draws() == first
    assert draws("sweep.seed=1") != first
    with pytest.raises(ValueError, match="sweep.seed"):
        draws("sweep.seed=-3")
