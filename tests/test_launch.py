"""launch/train.sh as users run it: under `ray job submit` against a private local head; and killed with
SIGKILL and rerun (locally), it continues exactly as that uninterrupted job ran."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from flythinker_worker.ports import free_ports

pytestmark = pytest.mark.slow
BIN = str(Path(sys.executable).parent)
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false"}


def train_cmd(assets, out_dir, *extra):
    return ["bash", "launch/train.sh", *tiny_overrides(assets, out_dir, "trainer.total_training_steps=12",
                                                       "trainer.save_freq=4", "trainer.test_freq=6", *extra)]


def records(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.fixture(scope="module")
def submitted_job(tiny_assets, tmp_path_factory):
    """ONE uninterrupted 12-step run of launch/train.sh, submitted with `ray job submit` to a private local
    head: (the `ray job submit` result, its output dir). It is also the reference of the kill -9 test."""
    tmp_path = tmp_path_factory.mktemp("job")
    gcs, dashboard, *agent_ports = free_ports(7)  # distinct: Ray refuses a head whose components share one
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=8",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats",
         # Every agent port explicit: the defaults clash with the other Ray instance the suite runs.
         *(f"--{name}={port}" for name, port in zip(
             ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "ray-client-server-port"), agent_ports))],
        cwd=REPO, env=ENV, start_new_session=True, stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while True:
            probe = subprocess.run([f"{BIN}/ray", "job", "list", "--address", address], env=ENV,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        out_dir = tmp_path / "whole"
        for _ in range(10):  # the dashboard answers before its job agent is up: "No available agent"
            job = subprocess.run(
                [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
                 *train_cmd(tiny_assets, out_dir)],
                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=500)
            if "No available agent" not in job.stderr:
                break
            time.sleep(2)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # SIGTERM would drain for 30 s
            head.wait(timeout=90)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return job, out_dir


def test_ray_job_submit_runs_train_sh(submitted_job):
    job, out_dir = submitted_job
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in job.stdout
    assert [r["step"] for r in records(out_dir)] == list(range(1, 13))
    assert (out_dir / "final" / "flythinker.json").exists()


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tiny_assets, submitted_job, tmp_path):
    job, whole = submitted_job
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    crashed = tmp_path / "crashed"

    proc = subprocess.Popen(train_cmd(tiny_assets, crashed), cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(r["step"] >= 6 for r in records(crashed)):  # the step-4 checkpoint is behind us
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: driver, Ray, workers
    proc.wait()
    ckpts = crashed / "checkpoints"
    assert (ckpts / "global_step_4" / "COMPLETE").exists() and not (ckpts / "global_step_12").exists()
    # Leftovers of a crash mid-save must not be picked: a temp dir and a final-named dir without COMPLETE.
    (ckpts / ".tmp_global_step_8").mkdir(exist_ok=True)
    (ckpts / "global_step_10").mkdir()

    rerun = subprocess.run(train_cmd(tiny_assets, crashed), cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpts / 'global_step_4'} at step 4" in rerun.stdout

    expected, got = records(whole), records(crashed)
    assert [r["step"] for r in expected] == list(range(1, 13))
    assert [r["step"] for r in got] == list(range(1, 13))  # no duplicates from the crashed run
    for a, b in zip(expected, got):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
        assert ("val_loss" in a) == ("val_loss" in b)
    for part in ("generator", "reasoner"):
        final_a = load_file(whole / "final" / part / "model.safetensors")
        final_b = load_file(crashed / "final" / part / "model.safetensors")
        for name in final_a:
            torch.testing.assert_close(final_b[name], final_a[name], atol=1e-6, rtol=1e-5)
