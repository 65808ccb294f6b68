"""One run per output folder: an exclusive `fcntl.flock` on `<trainer.default_local_dir>/.run.lock`.

The kernel drops a flock when its process dies, so a lock left by a killed run (kill -9, OOM, a lost
node) is free again at once; its file still names that run, which the next run reports and takes over.
A second live run on the same folder fails at once, naming the holder's pid and host. (flock is
honoured across hosts on local disks and NFSv4; on other shared filesystems give each run its own folder.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)
LOCK_NAME = ".run.lock"


class RunDirInUse(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """Context manager holding the output folder's lock for the life of a run."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict | None = None  # what the file said when we took it (a dead run's record)

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunDirInUse(f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, "
                              "or give this run its own folder (trainer.experiment_name=NEW_NAME or "
                              "trainer.default_local_dir=DIR)") from None
        self.fd = fd
        self.previous = _read(fd)
        if self.previous:
            logger.warning("taking over %s from a run that is gone (%s)", self.path, _describe(self.previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly, nothing to take over
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict | None:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return {"unreadable": raw[:80].decode(errors="replace")}


def _describe(record: dict | None) -> str:
    if not record or "pid" not in record:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record['pid']} on host {record.get('host', '?')}, started {started}"
