"""One run per output folder: a live holder refuses a second run by pid and host; a killed holder's lock
is taken over; the training entry point takes the lock before Ray starts."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, compose, tiny_overrides

from recipe.run_lock import LOCK_NAME, RunDirInUse, RunLock

HOLD = textwrap.dedent("""
    import sys, time
    from recipe.run_lock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def hold_in_child(folder):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO})
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_run_is_refused_naming_the_holder_then_takes_over_after_a_kill(tmp_path):
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(RunDirInUse, match=f"pid {child.pid} on host {socket.gethostname()}"):
            with RunLock(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel drops the flock
        child.wait()
    with RunLock(tmp_path) as lock:
        assert lock.previous["pid"] == child.pid  # the dead run's record, reported and replaced
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean release leaves nothing to take over
    with RunLock(tmp_path) as lock:
        assert lock.previous is None


def test_training_entry_point_refuses_a_locked_folder_before_ray(tmp_path, tiny_assets, monkeypatch):
    from recipe import main_flythinker

    started = []
    monkeypatch.setattr(main_flythinker, "init_ray", started.append)
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(RunDirInUse, match=f"pid {child.pid}"):
            main_flythinker.run(compose(tiny_overrides(tiny_assets, tmp_path)))
        assert started == [] and not (tmp_path / "metrics.jsonl").exists()
    finally:
        child.kill()
        child.wait()
