"""The helper thread of the fast decoder's CPU overlap (`FastPairedDecoder(overlap=True)` on CPU): the
reasoner's part of a step runs there while the caller's thread runs the generator's. Plain torch.

Opt-in on CPU. On our 2-core machines it made the step slower, not faster: 8 x 128 tokens took 2.8 s
against 2.1 s sequentially (each thread's OpenMP team wants both cores), and about equal with a 1-thread
helper. And an idle helper left alive slowed the process's later CPU work (a sequential decode 2.8 s
instead of 2.1 s) until it ended, so it lives for one decoder call only (`stop`)."""

from __future__ import annotations

import functools
from concurrent import futures

import torch


class HelperThread:
    """One worker thread, started on first use, ended by `stop()`. Runs each function in the submitting
    thread's grad and inference mode (both are thread-local: a helper starts with grad on and outside
    inference mode, where writing an inference tensor in place raises)."""

    def __init__(self, name: str):
        self.name = name
        self._pool: futures.ThreadPoolExecutor | None = None

    def submit(self, fn, *args) -> futures.Future:
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix=self.name)
        return self._pool.submit(_in_modes, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), fn, *args)

    @property
    def running(self) -> bool:
        return self._pool is not None

    def stop(self) -> None:
        """Wait for the submitted work and end the thread (a later `submit` starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def stops_helper(method):
    """Decorate a decoder method so that the decoder's `_helper` ends when the method returns or raises."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self._helper.stop()
    return wrapper


def _in_modes(grad: bool, inference: bool, fn, *args):
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return fn(*args)
