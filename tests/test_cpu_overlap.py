"""The CPU overlap's helper thread: modes adopted from the submitter, errors returned, one-call lifetime."""

import threading

import pytest
import torch

from flythinker_worker.cpu_overlap import HelperThread


def modes():
    return threading.current_thread().name, torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def test_the_helper_runs_in_the_submitters_modes_on_its_own_thread():
    helper = HelperThread("test-helper")
    with torch.inference_mode():
        name, grad, inference = helper.submit(modes).result()
    assert name.startswith("test-helper") and (grad, inference) == (False, True)
    with torch.no_grad():
        assert helper.submit(modes).result()[1:] == (False, False)
    assert helper.submit(modes).result()[1:] == (True, False)
    helper.stop()


def test_stop_waits_for_the_work_and_ends_the_thread_and_errors_reach_the_caller():
    helper = HelperThread("test-stop")
    assert not helper.running
    release, done = threading.Event(), []
    helper.submit(lambda: (release.wait(5), done.append(1)))
    assert helper.running
    threading.Timer(0.2, release.set).start()
    helper.stop()  # returns only once the submitted function has finished
    assert done == [1] and not helper.running
    assert not [t for t in threading.enumerate() if t.name.startswith("test-stop")]

    def fails():
        raise ValueError("boom")

    future = helper.submit(fails)  # a new thread after stop
    with pytest.raises(ValueError, match="boom"):
        future.result()
    helper.stop()
