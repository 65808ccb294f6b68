"""Checkpoint directories that are never torn: each is written under a temporary name, renamed when
complete, and only then named by the `latest` pointer (itself replaced atomically)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from flythinker_worker.utils import read_jsonl, write_text_atomic

LATEST = "latest_checkpointed_iteration.txt"  # verl's name for the pointer
COMPLETE = "COMPLETE"


def checkpoint_root(default_local_dir: str) -> Path:
    return Path(default_local_dir) / "checkpoints"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step`."""
    tmp = root / f".tmp_global_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, driver_state: dict, keep: int | None) -> Path:
    """Seal `tmp` as global_step_<step>, point `latest` at it, prune old ones beyond `keep`."""
    (tmp / "driver_state.json").write_text(json.dumps(driver_state, indent=2))
    (tmp / COMPLETE).write_text("ok\n")
    final = root / f"global_step_{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, str(step))
    if keep is not None:
        steps = sorted(int(p.name.rsplit("_", 1)[1]) for p in root.glob("global_step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(root / f"global_step_{old}", ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. A pointer to a torn or missing directory is ignored in
    favour of the newest complete one."""
    candidates = []
    pointer = root / LATEST
    if pointer.exists():
        candidates.append(root / f"global_step_{pointer.read_text().strip()}")
    candidates += sorted(root.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]), reverse=True)
    for path in candidates:
        if (path / COMPLETE).exists() and (path / "driver_state.json").exists():
            return path
    return None


def read_driver_state(path: Path) -> dict:
    return json.loads((path / "driver_state.json").read_text())


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records past `max_step` (written by a run that crashed after its last checkpoint)."""
    if not path.exists():
        return
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= max_step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
