"""Small helpers shared by the worker, the recipe, data prep and evaluation: atomic files and folders,
torn-JSONL repair, dtype names, the worker's device, tokenizer loading. torch + stdlib only (transformers
lazily), so the worker package stays importable without Ray or verl."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Config names of dtypes (`fsdp.param_dtype`, `model.dtype`, `--dtype`); "auto" is resolved by device.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """torch dtype of a config name; `auto` is bf16 on cuda and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def local_device(device: str) -> torch.device:
    """This process's torch device: cuda:LOCAL_RANK (made current) or cpu."""
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return torch.device("cpu")


# ---- atomic files and folders ------------------------------------------------------------------------------

def _temp_name(path: Path) -> Path:
    # Per process and per call: two writers of the same target never share (or delete) a temp file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file beside it (fsynced, then renamed): readers see the old
    file or the new one, never a part."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise explain_os_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """`obj` as JSON (indent 2 unless told otherwise) written atomically to `path`."""
    dump_kwargs.setdefault("indent", 2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, **dump_kwargs) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` (an old `path` is moved aside
    first and deleted after), on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = _temp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_os_error(err, path) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def explain_os_error(err: OSError, path: str | os.PathLike, needed_bytes: int | None = None) -> OSError:
    """The same OSError class with a message a user can act on (disk full, read-only, permission)."""
    path = Path(path)
    free = None
    with contextlib.suppress(OSError):
        probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
    need = f", about {needed_bytes / 2**20:.1f} MiB needed" if needed_bytes else ""
    if err.errno == errno.ENOSPC or "No space left" in str(err):
        msg = f"no space left on the device writing {path} ({free_text(free)} free{need})"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = f"cannot write {path}: {os.strerror(err.errno)} (choose a writable directory)"
    else:
        return err
    return type(err)(err.errno, msg)


def free_text(free: int | None) -> str:
    return "unknown" if free is None else f"{free / 2**20:.1f} MiB"


# ---- JSONL with a possibly torn tail ----------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike, repair: bool = True) -> list[dict]:
    """The JSON objects of a JSONL file appended to line by line. A last line cut by a crash (no newline,
    or not JSON) is dropped and, with `repair`, truncated from the file; a bad line anywhere else is a
    ValueError naming it (never silently skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, offset = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        terminated = number < len(lines)
        if not terminated and not line:
            break  # the file ends with a newline
        try:
            record = json.loads(line) if line.strip() else None
            ok = record is None or isinstance(record, dict)
        except ValueError:
            ok = False
        tail = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
        if not ok or not terminated:
            if tail:
                break  # a torn last line: dropped below
            raise ValueError(f"{path} line {number} is not a JSON object; fix or delete the file")
        if record is not None:
            records.append(record)
        offset += len(line) + 1
    if offset < len(data) and repair:
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path,
                       len(data) - offset)
        with open(path, "r+b") as f:
            f.truncate(offset)
    return records


# ---- model sources -----------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_allowed() -> bool:
    """Whether transformers may reach the model hub: the launch scripts set HF_HUB_OFFLINE=1 unless the
    user exported HF_HUB_OFFLINE=0."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on")


def check_model_source(path: str, key: str) -> None:
    """Fail at start-up, naming the config `key`, unless `path` is a local model folder (config.json, or a
    FlyThinker checkpoint's flythinker.json) or, with hub access allowed, an `owner/name` hub id. Without
    this a typo surfaces minutes later inside a worker as "Repo id must be in the form ..." after
    several network retries."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "flythinker.json").exists():
            raise FileNotFoundError(f"{key}={path}: the folder has no config.json (not a Hugging Face model "
                                    "folder) and no flythinker.json (not a FlyThinker checkpoint)")
        return
    if p.exists():
        raise FileNotFoundError(f"{key}={path} is a file; give the model's folder")
    repo_like = bool(_REPO_ID.fullmatch(path)) and not path.startswith(("./", "../", "~"))
    if repo_like and hub_allowed():
        return
    hint = (" Hub downloads are off (HF_HUB_OFFLINE=1, the launch scripts' default): download the model "
            "first, or export HF_HUB_OFFLINE=0 to let transformers fetch it." if repo_like else "")
    raise FileNotFoundError(f"{key}={path}: no such local folder (relative paths start at {Path.cwd()}).{hint}")


# ---- tokenizers --------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The tokenizer at `path` (an HF model or tokenizer folder), or the project's tiny one for None."""
    if path is None:
        from .tiny import load_tiny_tokenizer

        return load_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
