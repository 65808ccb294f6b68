"""LongLaMP -> verl-format parquet: history retrieval, token budgets, bad-record accounting.

    python -m data_prep.longlamp --task product_review --source data/raw/product_review --out data/pr
    python -m data_prep.longlamp --task abstract_generation --source hub --out data/ag --history-k 4

`--source PATH` is a folder with one file per split (`train`, `val` or `validation`, `test`; .jsonl,
.json or .parquet, or shards `<split>-*.<ext>`). Writes OUTDIR/{train,val,test}.parquet and
OUTDIR/stats.json. The same input and arguments always give the same rows.

All or nothing: a run writes into a temp folder beside OUTDIR and renames it into place once every
split and stats.json are complete. A run that fails (a bad record with --strict, an unreadable
source, Ctrl-C) leaves the previous OUTDIR exactly as it was, never a mix of old and new splits.

`--splits` prepares a subset: the other splits' files already in OUTDIR (and anything else there)
are kept as they are, with their stats.json entries; stats.json's `written` lists the splits this
run prepared and `carried_over` the arguments each kept split was prepared with (a warning names
any that differ from this run's). A kept split of another task is an error.

Duplicates: a record with the same user id, input and output as an earlier record of its split is
dropped and counted as `skipped.duplicate` (also with --strict: it is not malformed). Records shared
by two splits are kept and counted in stats.json `overlap` (e.g. `"train/test": 3`) with a warning;
pairs with a split kept from an earlier run keep that run's count or, if it had none, are not
counted (prepare all splits to count them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_prep.outdir import check_out, keep_files, kept_splits, merge_report, previous_stats
from data_prep.output import ParquetRowWriter, SplitStats, record_key, split_pairs
from data_prep.retrieval import RETRIEVERS
from data_prep.rows import Budgets, RowBuilder
from data_prep.sources import SPLITS, RawRow, SourceError, find_split_files, iter_hub, iter_local
from data_prep.tasks import INVALID_JSON, TASKS, Problem, Record, get_spec, validate
from flythinker_worker import utils
from flythinker_worker.tiny import DEFAULT_SYSTEM_PROMPT  # noqa: F401 - the tiny template's default, re-exported

logger = logging.getLogger(__name__)

SETTINGS = ("user", "temporal")
DUPLICATE = "duplicate"


class BadRecordError(ValueError):
    """Raised in --strict mode at the first unusable record."""

    def __init__(self, split: str, index: int, problem: Problem, where: str) -> None:
        field = f" field {problem.field!r}" if problem.field else ""
        super().__init__(f"bad record in split {split!r} row {index} ({where}):{field} "
                         f"{problem.reason}: {problem.detail}")
        self.split, self.index, self.problem = split, index, problem


def load_tokenizer(path: str | None = None) -> Any:
    """The tokenizer at `path` (a local HF folder or hub name), or the project's tiny one; it must
    have a chat template."""
    try:
        tokenizer = utils.load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001 - name what failed to load, keep the cause
        raise SourceError(f"cannot load tokenizer {path!r}: {type(exc).__name__}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise SourceError(f"tokenizer {path or 'tiny'!r} has no chat template; prompts are built "
                          "with the generator's chat template (use an Instruct/chat tokenizer)")
    return tokenizer


def _rows(task: str, setting: str, split: str, files: list[Path] | None, progress: bool
          ) -> Iterator[RawRow]:
    # No files means the hub: it is streamed split by split.
    if files is None:
        return iter_hub(task, setting, split, progress)
    return iter_local(files, f"{task}/{split}", progress)


def prepare(task: str, source: str | Path, out: str | Path, *, setting: str = "user",
            history_k: int = 2, retriever: str = "bm25", tokenizer: Any = None,
            budgets: Budgets = Budgets(), strict: bool = False, splits: Sequence[str] = SPLITS,
            system_prompt: str | None = None, progress: bool = True,
            batch_rows: int = 256) -> dict[str, Any]:
    """Prepare `task` from `source` ("hub" or a folder) into `out`; returns the stats.json dict.

    `tokenizer` is a loaded tokenizer, a path for `AutoTokenizer`, or None for the tiny one.
    Bad records are skipped and counted by reason; with `strict` the first one raises
    BadRecordError naming its split, row and field. `system_prompt` None (default) writes no system
    turn, so the tokenizer's chat template adds its own default. `out` is replaced only when the whole run
    succeeds; splits not in `splits` already there are kept (see the module docstring).
    """
    spec = get_spec(task)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    if retriever not in RETRIEVERS:
        raise ValueError(f"unknown retriever {retriever!r}; expected one of {', '.join(RETRIEVERS)}")
    if history_k < 0:
        raise ValueError(f"--history-k must be >= 0, got {history_k}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be a non-empty subset of {', '.join(SPLITS)}, got {list(splits)}")
    splits = [s for s in SPLITS if s in splits]
    out = Path(out)
    check_out(out)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer_name = "tiny" if tokenizer is None else str(tokenizer)
        tokenizer = load_tokenizer(None if tokenizer is None else str(tokenizer))
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    from_hub = str(source) == "hub"
    # Find every split's files and check what OUTDIR keeps first: these fail before any work.
    files = {s: None if from_hub else find_split_files(source, s) for s in splits}
    kept = kept_splits(out, task, splits)
    previous, warnings = previous_stats(out) if kept else ({}, [])
    builder = RowBuilder(spec, tokenizer, history_k, retriever, budgets, system_prompt)
    report: dict[str, Any] = {
        "args": {"task": task, "source": str(source), "out": str(out), "setting": setting,
                 "history_k": history_k, "retriever": retriever, "tokenizer": tokenizer_name,
                 "max_history_tokens": budgets.history, "max_query_tokens": budgets.query,
                 "max_response_tokens": budgets.response, "strict": strict, "splits": list(splits),
                 "system_prompt": system_prompt},
        "written": list(splits), "splits": {},
    }
    results: dict[str, SplitStats] = {}
    keys: dict[str, set[bytes]] = {}
    with utils.atomic_directory(out) as tmp:
        for split in splits:
            results[split], keys[split] = _prepare_split(
                split, _rows(task, setting, split, files[split], progress), tmp / f"{split}.parquet",
                builder, strict, batch_rows, files[split] or [], f"hub {task}_{setting}")
            report["splits"][split] = results[split].to_dict()
        overlap = {f"{a}/{b}": len(keys[a] & keys[b]) for a, b in split_pairs(splits)}
        warnings += merge_report(report, previous, kept, overlap)
        report["warnings"] = warnings
        keep_files(out, tmp, splits)
        utils.write_json_atomic(tmp / "stats.json", report, sort_keys=True, ensure_ascii=False)
    for warning in warnings:
        logger.warning("%s: %s", out, warning)
    report["summary"] = f"{task}: " + "; ".join(f"{s} {st.summary()}" for s, st in results.items())
    if kept:
        report["summary"] += f"; {', '.join(kept)} carried over from the previous output"
    return report


def _prepare_split(split: str, rows: Iterator[RawRow], path: Path, builder: RowBuilder, strict: bool,
                   batch_rows: int, files: list[Path], hub: str) -> tuple[SplitStats, set[bytes]]:
    """Write one split's rows to `path`; returns its stats and the keys of the records kept."""
    spec = builder.spec
    need_history = builder.retriever != "none" and builder.history_k > 0
    stats = SplitStats(files=[str(p) for p in files])
    seen: set[bytes] = set()
    with ParquetRowWriter(path, batch_rows) as writer:
        for raw in rows:
            stats.read += 1
            checked = (Problem(INVALID_JSON, "", raw.error) if raw.error is not None
                       else validate(raw.value, spec, need_history))
            if isinstance(checked, Problem):
                if strict:
                    raise BadRecordError(split, raw.index, checked, ", ".join(stats.files) or hub)
                stats.skipped[checked.reason] += 1
                continue
            assert isinstance(checked, Record)
            key = record_key(checked.user_id, checked.query, checked.output)
            if key in seen:
                stats.skipped[DUPLICATE] += 1
                continue
            seen.add(key)
            row, cut = builder.build(checked, split, raw.index)
            writer.add(row)
            stats.keep(row, cut)
    return stats, seen


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m data_prep.longlamp`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--source", required=True,
                        help="'hub' (stream LongLaMP/LongLaMP with `datasets`) or a local folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--setting", default="user", choices=SETTINGS,
                        help="hub config suffix: user-based or temporal split (default user)")
    parser.add_argument("--history-k", type=int, default=2,
                        help="profile items in the prompt (paper: 2; ablation: 3, 4)")
    parser.add_argument("--retriever", default="bm25", choices=RETRIEVERS,
                        help="bm25 (LongLaMP), recent, or none (non-personalized baseline)")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer folder (e.g. a local Qwen2.5-Instruct); default: the tiny one")
    parser.add_argument("--max-history-tokens", type=int, default=Budgets.history)
    parser.add_argument("--max-query-tokens", type=int, default=Budgets.query)
    parser.add_argument("--max-response-tokens", type=int, default=Budgets.response)
    parser.add_argument("--splits", default=",".join(SPLITS),
                        help="comma-separated subset of train,val,test (default all)")
    parser.add_argument("--system-prompt", default=None, metavar="TEXT",
                        help="write this system turn into every prompt; default: none, so the tokenizer's "
                             "chat template adds its own default (Qwen2.5: 'You are Qwen, created by "
                             "Alibaba Cloud. ...'; the tiny one: 'You are a helpful assistant.')")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)
    # Warnings (overlap between splits, kept splits made with other settings) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        budgets = Budgets(args.max_history_tokens, args.max_query_tokens, args.max_response_tokens)
        report = prepare(args.task, args.source, args.out, setting=args.setting,
                         history_k=args.history_k, retriever=args.retriever, tokenizer=args.tokenizer,
                         budgets=budgets, strict=args.strict,
                         splits=[s.strip() for s in args.splits.split(",") if s.strip()],
                         system_prompt=args.system_prompt, progress=not args.no_progress)
    except (SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report['summary']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
