"""The output folder of `data_prep.longlamp` as one unit: what a run that prepares only some splits
keeps from the previous output (files and stats.json entries), and the cross-split overlap report.

The folder itself is replaced with `flythinker_worker.utils.atomic_directory`; this module decides
what goes into the new one besides the splits the run writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from data_prep.output import split_pairs
from data_prep.sources import SPLITS

# Arguments that change the rows of a split: a kept split prepared with other values is reported.
ROW_ARGS = ("task", "setting", "history_k", "retriever", "tokenizer", "max_history_tokens",
            "max_query_tokens", "max_response_tokens", "system_prompt")


def check_out(out: Path) -> None:
    """Refuse an OUTDIR that cannot be replaced as a whole: a file, or the working directory or
    one of its parents (replacing it would pull the folder out from under this process)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"--out {out} is the working directory or holds it; choose a dedicated "
                         "output folder (it is replaced as a whole)")


def kept_splits(out: Path, task: str, splits: Sequence[str]) -> list[str]:
    """The splits this run does not prepare whose parquet is already in `out`; each must be of
    `task` (a ValueError otherwise: the folder would mix tasks)."""
    kept = []
    for split in SPLITS:
        path = out / f"{split}.parquet"
        if split in splits or not path.is_file():
            continue
        try:
            parquet = pq.ParquetFile(path)
            found = (parquet.read_row_group(0, columns=["task"]).column(0)[0].as_py()
                     if parquet.metadata.num_rows else task)
        except Exception as exc:  # noqa: BLE001 - any unreadable kept split must stop the run
            raise ValueError(f"cannot read {path} (a split this run would keep): "
                             f"{type(exc).__name__}: {exc}; prepare every split or remove it") from exc
        if found != task:
            raise ValueError(f"{path} holds task {found!r}, not {task!r}: prepare every split "
                             "(--splits train,val,test) or choose another --out")
        kept.append(split)
    return kept


def previous_stats(out: Path) -> tuple[dict[str, Any], list[str]]:
    """The previous run's stats.json in `out` ({} when absent) and warnings about it."""
    path = out / "stats.json"
    if not path.is_file():
        return {}, []
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stats, dict):
            return stats, []
    except (OSError, ValueError):
        pass
    return {}, [f"{path} is unreadable: the kept splits' stats are unknown"]


def keep_files(old: Path, new: Path, written: Sequence[str]) -> None:
    """Hard-link (or copy) into `new` everything in `old` that this run does not write: the other
    splits' parquet files and anything else a user keeps there. Stale temp files are left out."""
    if not old.is_dir():
        return
    replaced = {f"{split}.parquet" for split in written} | {"stats.json"}
    for entry in old.iterdir():
        if entry.name in replaced or (entry.name.startswith(".") and ".tmp-" in entry.name):
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target, follow_symlinks=False)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike, *, follow_symlinks: bool = True) -> None:
    # A hard link keeps the bytes identical at no cost; file systems without hard links get a copy.
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=follow_symlinks)


def merge_report(report: dict[str, Any], previous: dict[str, Any], kept: Sequence[str],
                 overlap: dict[str, int]) -> list[str]:
    """Add the kept splits (stats entries, the arguments they were prepared with) and the overlap
    counts to `report`, in place; returns the warnings for the user."""
    warnings = []
    args = report["args"]
    carried: dict[str, Any] = {}
    for split in kept:
        entry = previous.get("splits", {}).get(split)
        made_with = previous.get("carried_over", {}).get(split) or previous.get("args")
        if entry is None or made_with is None:
            warnings.append(f"kept {split}.parquet has no entry in the previous stats.json: its "
                            "counts and settings are unknown")
        report["splits"][split] = entry
        carried[split] = made_with
        differ = [f"{k} {made_with.get(k)!r} (this run {args[k]!r})" for k in ROW_ARGS
                  if made_with is not None and made_with.get(k) != args[k]]
        if differ:
            warnings.append(f"kept {split}.parquet was prepared with other settings: {', '.join(differ)}")
    report["splits"] = {s: report["splits"][s] for s in SPLITS if s in report["splits"]}
    report["carried_over"] = carried
    # A count between two kept splits still holds (neither changed). A kept split and a written one
    # are not compared: the kept split's record keys are not stored anywhere.
    kept_pairs = {f"{a}/{b}" for a, b in split_pairs(kept)}
    overlap = {**overlap, **{pair: n for pair, n in previous.get("overlap", {}).items() if pair in kept_pairs}}
    report["overlap"] = {f"{a}/{b}": overlap[f"{a}/{b}"] for a, b in split_pairs(SPLITS)
                         if f"{a}/{b}" in overlap}
    for pair, count in report["overlap"].items():
        if count:
            a, b = pair.split("/")
            warnings.append(f"{count} record(s) of {a} are also in {b} (same user, input and output)")
    return warnings
