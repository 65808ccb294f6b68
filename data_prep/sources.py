"""Streaming readers for raw LongLaMP splits: a local folder (.jsonl/.json/.parquet) or the HF hub.

Every reader yields `RawRow`s one at a time, so memory stays bounded by one record (plus one
parquet batch) whatever the file size. The `_user` train files are 1.2-1.9 GB: use .jsonl or
.parquet for them; .json arrays are streamed too, with a bounded buffer.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

SPLITS = ("train", "val", "test")
# Local file names accepted for each output split; LongLaMP says `val`, some loaders `validation`.
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
EXTENSIONS = (".jsonl", ".json", ".parquet")
HUB_REPO = "LongLaMP/LongLaMP"
_JSON_CHUNK = 1 << 20
# A .json array is decoded from a rolling buffer; a single value bigger than this is an error
# (or, far more likely, the file is malformed and the decoder is waiting for a closing brace).
_JSON_MAX_BUFFER = 256 << 20


class SourceError(RuntimeError):
    """The input cannot be read at all (as opposed to one bad record, which is skipped)."""


@dataclass(frozen=True)
class RawRow:
    """One raw record: its position in the split, the parsed value, or why it could not be parsed."""

    index: int
    value: Any = None
    error: str | None = None


def find_split_files(folder: str | Path, split: str) -> list[Path]:
    """The files holding `split` in `folder`: `<name>.<ext>` or shards `<name>-*.<ext>`, sorted.

    `<name>` is the split or its alias (`val`/`validation`); exactly one name/extension may match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"--source {folder} is not a directory (expected one file per split)")
    matches: dict[str, list[Path]] = {}
    for name in SPLIT_NAMES[split]:
        for ext in EXTENSIONS:
            single = folder / f"{name}{ext}"
            found = [single] if single.is_file() else sorted(folder.glob(f"{name}-*{ext}"))
            if found:
                matches[f"{name}{ext}"] = found
    if not matches:
        wanted = ", ".join(f"{n}{e}" for n in SPLIT_NAMES[split] for e in EXTENSIONS)
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SourceError(f"no file for split {split!r} in {folder}: looked for {wanted}; "
                          f"found {present}")
    if len(matches) > 1:
        raise SourceError(f"split {split!r} is ambiguous in {folder}: {', '.join(sorted(matches))}; "
                          "keep one")
    return next(iter(matches.values()))


def _progress(total: int | None, desc: str, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not enabled, mininterval=1.0, dynamic_ncols=True)


def _iter_jsonl(path: Path, start: int, bar: tqdm) -> Iterator[RawRow]:
    index = start
    with open(path, "rb") as f:
        for line in f:
            bar.update(len(line))
            if not line.strip():
                continue  # blank lines are not records and take no row index
            try:
                yield RawRow(index, json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield RawRow(index, error=f"{path.name}: {exc}")
            index += 1


def _iter_json_values(f: BinaryIO, path: Path, bar: tqdm) -> Iterator[Any]:
    """Values of a JSON array (or of concatenated JSON values) without loading the whole file."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, in_array = "", 0, False, None

    def fill() -> bool:
        nonlocal buf, pos, eof
        chunk = f.read(_JSON_CHUNK)
        bar.update(len(chunk))
        eof = not chunk
        buf = buf[pos:] + utf8.decode(chunk, final=eof)
        pos = 0
        if len(buf) > _JSON_MAX_BUFFER:
            raise SourceError(f"{path}: malformed JSON or a single record over "
                              f"{_JSON_MAX_BUFFER >> 20} MiB; convert it to .jsonl")
        return not eof

    fill()
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n":
            pos += 1
        if pos >= len(buf):
            if eof:
                return
            fill()
            continue
        char = buf[pos]
        if in_array is None:
            in_array = char == "["
            pos += 1 if in_array else 0
            continue
        if in_array and char == ",":
            pos += 1
            continue
        if in_array and char == "]":
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if eof:
                raise SourceError(f"{path}: invalid JSON ({exc}); the file cannot be read past this "
                                  "point (use .jsonl to skip single bad records)") from exc
            fill()
            continue
        if end == len(buf) and not eof:
            # A value ending exactly at the buffer end may be cut (a number); decode it again.
            fill()
            continue
        yield value
        pos = end


def _iter_json(path: Path, start: int, bar: tqdm) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        for offset, value in enumerate(_iter_json_values(f, path, bar)):
            yield RawRow(start + offset, value)


def _iter_parquet(path: Path, start: int, bar: tqdm) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    index = start
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=512):
        for value in batch.to_pylist():
            yield RawRow(index, value)
            index += 1
        bar.update(batch.num_rows)


def iter_local(files: list[Path], desc: str, progress: bool = True) -> Iterator[RawRow]:
    """Raw rows of one split stored in `files` (shards in order), with a progress bar on stderr."""
    index = 0
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            total, unit, reader = pq.ParquetFile(path).metadata.num_rows, "rec", _iter_parquet
        else:
            total, unit = path.stat().st_size, "B"
            reader = _iter_jsonl if path.suffix == ".jsonl" else _iter_json
        with _progress(total, f"{desc} {path.name}", unit, progress) as bar:
            for row in reader(path, index, bar):
                index = row.index + 1
                yield row


def iter_hub(task: str, setting: str, split: str, progress: bool = True) -> Iterator[RawRow]:
    """Stream `LongLaMP/LongLaMP` config `<task>_<setting>` from the Hugging Face hub.

    Raises SourceError naming the config and split when the hub (or `datasets`) is unavailable.
    """
    config = f"{task}_{setting}"
    hint = ("the hub may be unreachable from this machine: download the split files elsewhere "
            "and pass --source PATH (a folder with train/val/test .jsonl, .json or .parquet)")
    try:
        import datasets
    except ImportError as exc:
        raise SourceError(f"--source hub needs the `datasets` package ({exc}); {hint}") from exc
    errors: list[str] = []
    for name in SPLIT_NAMES[split]:
        try:
            stream = iter(datasets.load_dataset(HUB_REPO, name=config, split=name, streaming=True))
            first = next(stream, None)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot stream"; report it
            errors.append(f"split {name!r}: {type(exc).__name__}: {exc}")
            continue
        return _hub_rows(first, stream, f"{config}/{name}", progress, hint)
    raise SourceError(f"cannot stream {HUB_REPO} config {config!r} split {split!r} "
                      f"({'; '.join(errors)}); {hint}")


def _hub_rows(first: Any, stream: Iterator[Any], desc: str, progress: bool, hint: str
              ) -> Iterator[RawRow]:
    if first is None:
        return
    with _progress(None, desc, "rec", progress) as bar:
        yield RawRow(0, first)
        bar.update(1)
        index = 1
        while True:
            try:
                value = next(stream)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a broken stream must name where it broke
                raise SourceError(f"{HUB_REPO} {desc}: stream failed after {index} records "
                                  f"({type(exc).__name__}: {exc}); {hint}") from exc
            yield RawRow(index, value)
            bar.update(1)
            index += 1
