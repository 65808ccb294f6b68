"""The resumable predictions JSONL that generation writes and evaluation reads."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from flythinker_worker.utils import read_jsonl, write_json_atomic

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A predictions file that cannot be scored; the message names the file and line."""


class PredictionWriter:
    """Predictions JSONL, one object per line with a unique `id`, appended and flushed per batch, so a
    killed run loses at most its current batch. Reopening reads the ids already there (`done`) and
    repairs a torn last line (a partial write from a crash) by truncating it away; a bad line anywhere
    else is an error, never silently dropped. `settings` (what changes the outputs: model, data,
    sampling, seed) is kept in `<path>.meta.json`; resuming with different settings is refused."""

    def __init__(self, path: str | os.PathLike, settings: dict | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in (self.path, self.meta_path):
                p.unlink(missing_ok=True)
        self._check_settings(settings)
        self.done: set[str] = self._recover() if self.path.exists() else set()
        self._file = open(self.path, "a", encoding="utf-8")

    def _check_settings(self, settings: dict | None) -> None:
        if settings is None:
            return
        settings = json.loads(json.dumps(settings))  # the JSON view (tuples -> lists) for comparing
        pinned = {}
        if self.meta_path.exists() and self.path.exists():
            old = json.loads(self.meta_path.read_text())
            pinned = old.pop("pinned", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
                raise ValueError(f"{self.path} was generated with other settings ({changes}); use another "
                                 "output.path, or output.overwrite=true to start over")
        write_json_atomic(self.meta_path, {**settings, **({"pinned": pinned} if pinned else {})}, sort_keys=True)

    def _recover(self) -> set[str]:
        done = set()
        for number, record in enumerate(read_jsonl(self.path), start=1):
            if "id" not in record:
                raise ValueError(f"{self.path} record {number} has no `id`; fix or delete the file")
            if str(record["id"]) in done:
                raise ValueError(f"{self.path} record {number}: duplicate id {record['id']!r}")
            done.add(str(record["id"]))
        return done

    def write(self, records: Sequence[dict]) -> None:
        """Append `records` (each with a new `id`) and flush them to disk."""
        for record in records:
            if record["id"] in self.done:
                raise ValueError(f"id {record['id']!r} is already in {self.path}")
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.done.add(record["id"])
        self._file.flush()
        os.fsync(self._file.fileno())

    def pin(self, key: str, value) -> None:
        """Record a setting known only once generation starts (e.g. the engine the workers resolved) in the
        meta file; ValueError when rows already written were made with another value."""
        value = json.loads(json.dumps(value))
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        pinned = meta.get("pinned", {})
        if self.done and key in pinned and pinned[key] != value:
            raise ValueError(f"{self.path} was generated with {key}={pinned[key]!r}, this run resolves "
                             f"{value!r}; use another output.path, or output.overwrite=true to start over")
        write_json_atomic(self.meta_path, {**meta, "pinned": {**pinned, key: value}}, sort_keys=True)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_predictions(path: str | Path, dedup: bool = False) -> list[dict]:
    """Rows of a predictions JSONL (`id`, `prediction`, `reference`, optional `task`, `n_tokens`, ...).
    A repeated id would be scored twice: it is an InputError with the count, or with `dedup` the first
    row of each id is kept and the number dropped is logged."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("id", "prediction", "reference"):
                if key not in row:
                    raise InputError(f"{path}:{lineno}: row has no {key!r} field")
            for key in ("prediction", "reference"):
                if not isinstance(row[key], str):
                    raise InputError(f"{path}:{lineno}: {key!r} must be a string, got {type(row[key]).__name__}")
            if not row["reference"].strip():
                raise InputError(f"{path}:{lineno}: empty reference")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no prediction rows (empty file)")
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(str(row["id"]), row)
    n_dup = len(rows) - len(first)
    if n_dup and not dedup:
        seen, repeated = set(), []
        for row in rows:
            key = str(row["id"])
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        raise InputError(f"{path}: {n_dup} rows repeat an id ({len(repeated)} ids, e.g. {repeated[:3]}); they "
                         "would be scored twice. Remove them, or pass --dedup to keep the first row of each id")
    if n_dup:
        logger.warning("%s: dropped %d rows with a repeated id (kept the first of each)", path, n_dup)
    return list(first.values())
