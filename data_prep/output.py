"""Output side of data prep: the parquet row schema, a streaming writer, record keys, per-split stats."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# `messages` is what verl's MultiTurnSFTDataset reads; `prompt` (messages without the assistant
# turn) is what generation/RL datasets read.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("task", pa.string()),
    ("user_id", pa.string()),
    ("messages", _MESSAGES),
    ("prompt", _MESSAGES),
    ("response", pa.string()),
    ("reference", pa.string()),
    ("n_prompt_tokens", pa.int32()),
    ("n_response_tokens", pa.int32()),
    ("n_history_tokens", pa.int32()),
    ("n_query_tokens", pa.int32()),
    ("n_history_items", pa.int32()),
])
TOKEN_FIELDS = ("prompt", "response", "history", "query")


class ParquetRowWriter:
    """Writes rows to `path` in row groups of `batch_rows`, holding at most one batch in memory.

    It writes in place: `prepare` points it into a temp folder that replaces the output folder
    only when every file of the run is complete (`flythinker_worker.utils.atomic_directory`).
    """

    def __init__(self, path: str | Path, batch_rows: int = 256) -> None:
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.path = Path(path)
        self.batch_rows = batch_rows
        self.rows: list[dict[str, Any]] = []
        self.n_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetRowWriter:
        self._writer = pq.ParquetWriter(self.path, ROW_SCHEMA)
        return self

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row; a full batch is written out."""
        self.rows.append(row)
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.rows and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=ROW_SCHEMA))
            self.n_rows += len(self.rows)
            self.rows = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self._flush()
        if self._writer is not None:
            self._writer.close()
        if exc_type is None:
            # On disk before the folder rename publishes it (a crash must not leave a torn file).
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())


def record_key(user_id: str, query: str, output: str) -> bytes:
    """16-byte digest identifying a record: who wrote what for which query. LongLaMP has no record
    id; the profile is left out (it is the user's history, not the task instance). Sets of these
    digests find duplicates and cross-split overlap in bounded memory, without keeping the texts."""
    # ASCII JSON of the triple: unambiguous field boundaries, and lone surrogates encode too.
    encoded = json.dumps([user_id, query, output]).encode("ascii")
    return hashlib.blake2b(encoded, digest_size=16).digest()


def split_pairs(splits: Sequence[str]) -> list[tuple[str, str]]:
    """The unordered pairs of `splits`, in order: ("train", "val"), ("train", "test"), ..."""
    return [(a, b) for i, a in enumerate(splits) for b in splits[i + 1:]]


def nearest_rank(histogram: Counter[int], pct: float) -> int:
    """The nearest-rank percentile of the values counted in `histogram` (0 when empty).

    The smallest value v with at least ceil(pct/100 * N) of the N values <= v.
    """
    total = sum(histogram.values())
    if total == 0:
        return 0
    rank = max(1, math.ceil(pct / 100.0 * total))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


@dataclass
class SplitStats:
    """Counts for one split. Token lengths are kept as value histograms, so memory is bounded by
    the number of distinct lengths (bounded by the budgets), not by the number of records."""

    read: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: Counter[str] = field(default_factory=Counter)
    lengths: dict[str, Counter[int]] = field(default_factory=lambda: {k: Counter() for k in TOKEN_FIELDS})
    files: list[str] = field(default_factory=list)

    def keep(self, row: dict[str, Any], cut: dict[str, bool]) -> None:
        """Count a written row and which of its parts were truncated."""
        self.kept += 1
        for name in TOKEN_FIELDS:
            self.lengths[name][int(row[f"n_{name}_tokens"])] += 1
        for name, was_cut in cut.items():
            if was_cut:
                self.truncated[name] += 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: counts, skip reasons, truncations, token-length percentiles."""
        tokens = {name: {"p50": nearest_rank(h, 50), "p90": nearest_rank(h, 90),
                         "p99": nearest_rank(h, 99), "max": max(h) if h else 0}
                  for name, h in self.lengths.items()}
        return {"read": self.read, "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "n_skipped": sum(self.skipped.values()), "truncated": dict(sorted(self.truncated.items())),
                "tokens": tokens, "files": self.files}

    def summary(self) -> str:
        """One-line human summary, e.g. `train kept 98/100 (skipped 2: empty_output=2)`."""
        text = f"kept {self.kept}/{self.read}"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f" (skipped {sum(self.skipped.values())}: {reasons})"
        return text
