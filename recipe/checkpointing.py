"""Checkpoint directories that are never torn: each is written under a temporary name of its own run,
renamed when complete, and only then named by the `latest` pointer (itself replaced atomically). Each
checkpoint keeps the config that trained it, so a resume can refuse a config that changed what is trained.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from flythinker_worker.utils import explain_os_error, free_text, read_jsonl, write_json_atomic, write_text_atomic

LATEST = "latest_checkpointed_iteration.txt"  # verl's name for the pointer
COMPLETE = "COMPLETE"
CONFIG = "config.json"
TEMP_PREFIX = ".tmp_global_step_"
# Keys that only steer bookkeeping: changing them on resume is applied (and printed). Every other key
# changes what is trained (model, fusion, data, batch sizes, optimizer, schedule, seed, world) and
# refuses the resume. Prefixes end with "." for whole sections.
BOOKKEEPING = ("trainer.total_epochs", "trainer.total_training_steps", "trainer.save_freq", "trainer.test_freq",
               "trainer.logger", "trainer.project_name", "trainer.experiment_name", "trainer.max_ckpt_to_keep",
               "trainer.resume_mode", "trainer.resume_from_path", "trainer.default_local_dir", "val_generation.",
               "data.val_files", "data.val_batch_size")
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # names this process's temp dirs


def checkpoint_root(default_local_dir: str) -> Path:
    return Path(default_local_dir) / "checkpoints"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step`, private to this run."""
    tmp = root / f"{TEMP_PREFIX}{step}.{RUN_ID}"
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, driver_state: dict, keep: int | None,
           config: dict | None = None) -> Path:
    """Seal `tmp` as global_step_<step>, point `latest` at it, prune old ones beyond `keep`."""
    write_json_atomic(tmp / "driver_state.json", driver_state)
    if config is not None:
        write_json_atomic(tmp / CONFIG, config)
    write_text_atomic(tmp / COMPLETE, "ok\n")
    final = root / f"global_step_{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, str(step))
    if keep is not None:
        steps = sorted(int(p.name.rsplit("_", 1)[1]) for p in root.glob("global_step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(root / f"global_step_{old}", ignore_errors=True)
    return final


def write(root: Path, step: int, save_shards: Callable[[Path], None], driver_state: dict, keep: int | None,
          config: dict | None = None, needed_bytes: int | None = None) -> Path:
    """Write the checkpoint of `step`: check free space, let `save_shards(tmp)` fill a private temp dir,
    commit it. On any failure the temp dir is removed and the previous checkpoint stays the latest; a
    full disk is an OSError naming the path and the space needed."""
    root.mkdir(parents=True, exist_ok=True)
    if needed_bytes is not None:
        free = shutil.disk_usage(root).free
        if free < needed_bytes:
            raise OSError(errno.ENOSPC, f"not enough space for the checkpoint of step {step} in {root}: about "
                          f"{needed_bytes / 2**20:.1f} MiB needed, {free_text(free)} free. Free space or "
                          f"point trainer.default_local_dir elsewhere; {_intact(root)}")
    tmp = begin(root, step)
    try:
        save_shards(tmp)
        return commit(root, tmp, step, driver_state, keep, config)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # A worker's OSError reaches the driver wrapped by Ray: a full disk is recognised by its message.
        cause = err if isinstance(err, OSError) else (
            OSError(errno.ENOSPC, str(err)) if "No space left" in str(err) else None)
        if cause is None:
            raise
        clear = explain_os_error(cause, tmp, needed_bytes)
        raise type(cause)(cause.errno, f"{clear.strerror or clear} (checkpoint of step {step} abandoned; "
                                       f"{_intact(root)})") from err


def _intact(root: Path) -> str:
    previous = latest(root)
    return f"the last complete checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete temp dirs left by runs that died mid-checkpoint (call only while holding the run lock)."""
    stale = [p for p in root.glob(f"{TEMP_PREFIX}*") if p.is_dir() and not p.name.endswith(RUN_ID)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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


def read_config(path: Path) -> dict | None:
    """The config the checkpoint at `path` was trained with (None for checkpoints that predate it)."""
    file = path / CONFIG
    return json.loads(file.read_text()) if file.exists() else None


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """(defining, bookkeeping): {key: (old, new)} for every key whose value differs."""
    old, new = flatten(saved), flatten(json.loads(json.dumps(current)))  # JSON view: tuples -> lists
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    bookkeeping = {k: v for k, v in changed.items()
                   if any(k == b or (b.endswith(".") and k.startswith(b)) for b in BOOKKEEPING)}
    return {k: v for k, v in changed.items() if k not in bookkeeping}, bookkeeping


def check_resume(checkpoint: Path, current: dict) -> dict:
    """Refuse to resume `checkpoint` under a config that changes what is trained (ValueError naming each
    key, old -> new); return the bookkeeping changes that will be applied."""
    saved = read_config(checkpoint)
    if saved is None:
        return {}
    defining, bookkeeping = config_changes(saved, current)
    if defining:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in defining.items())
        raise ValueError(
            f"cannot resume from {checkpoint}: the config changed what is trained:\n{lines}\n"
            "Resuming would keep training the old run with its old settings. To start a new run, give it a "
            "folder of its own (trainer.experiment_name=NEW_NAME or trainer.default_local_dir=DIR); to "
            "continue the old run, drop these overrides.")
    return bookkeeping


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records past `max_step` (written by a run that crashed after its last checkpoint)."""
    if not path.exists():
        return
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= max_step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
