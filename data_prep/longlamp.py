"""LongLaMP -> verl-format parquet: history retrieval, token budgets, bad-record accounting.

    python -m data_prep.longlamp --task product_review --source data/raw/product_review --out data/pr
    python -m data_prep.longlamp --task abstract_generation --source hub --out data/ag --history-k 4

`--source PATH` is a folder with one file per split (`train`, `val` or `validation`, `test`; .jsonl,
.json or .parquet, or shards `<split>-*.<ext>`). Writes OUTDIR/{train,val,test}.parquet and
OUTDIR/stats.json. The same input and arguments always give the same rows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_prep.output import AtomicParquetWriter, SplitStats, write_json_atomic
from data_prep.retrieval import RETRIEVERS
from data_prep.rows import DEFAULT_SYSTEM_PROMPT, Budgets, RowBuilder
from data_prep.sources import SPLITS, RawRow, SourceError, find_split_files, iter_hub, iter_local
from data_prep.tasks import INVALID_JSON, TASKS, Problem, Record, get_spec, validate

SETTINGS = ("user", "temporal")


class BadRecordError(ValueError):
    """Raised in --strict mode at the first unusable record."""

    def __init__(self, split: str, index: int, problem: Problem, where: str) -> None:
        field = f" field {problem.field!r}" if problem.field else ""
        super().__init__(f"bad record in split {split!r} row {index} ({where}):{field} "
                         f"{problem.reason}: {problem.detail}")
        self.split, self.index, self.problem = split, index, problem


def load_tokenizer(path: str | None = None) -> Any:
    """The tokenizer at `path` (a local HF folder or hub name), or the project's tiny one."""
    if path is None:
        from flythinker_worker.tiny import load_tiny_tokenizer

        tokenizer = load_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
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
            system_prompt: str = DEFAULT_SYSTEM_PROMPT, progress: bool = True,
            batch_rows: int = 256) -> dict[str, Any]:
    """Prepare `task` from `source` ("hub" or a folder) into `out`; returns the stats.json dict.

    `tokenizer` is a loaded tokenizer, a path for `AutoTokenizer`, or None for the tiny one.
    Bad records are skipped and counted by reason; with `strict` the first one raises
    BadRecordError naming its split, row and field. Each output file appears only when complete.
    """
    spec = get_spec(task)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    if retriever not in RETRIEVERS:
        raise ValueError(f"unknown retriever {retriever!r}; expected one of {', '.join(RETRIEVERS)}")
    if history_k < 0:
        raise ValueError(f"--history-k must be >= 0, got {history_k}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {', '.join(SPLITS)}, got {list(splits)}")
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer_name = "tiny" if tokenizer is None else str(tokenizer)
        tokenizer = load_tokenizer(None if tokenizer is None else str(tokenizer))
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    from_hub = str(source) == "hub"
    # Find every split's files first: a missing split fails before any work is done.
    files = {s: None if from_hub else find_split_files(source, s) for s in splits}
    need_history = retriever != "none" and history_k > 0
    builder = RowBuilder(spec, tokenizer, history_k, retriever, budgets, system_prompt)
    out = Path(out)
    results: dict[str, SplitStats] = {}
    for split in splits:
        stats = results[split] = SplitStats(files=[str(p) for p in files[split] or []])
        # Opened before the writer: an unreachable hub fails before OUTDIR is even created.
        rows = _rows(task, setting, split, files[split], progress)
        with AtomicParquetWriter(out / f"{split}.parquet", batch_rows) as writer:
            for raw in rows:
                stats.read += 1
                checked = (Problem(INVALID_JSON, "", raw.error) if raw.error is not None
                           else validate(raw.value, spec, need_history))
                if isinstance(checked, Problem):
                    if strict:
                        where = ", ".join(stats.files) or f"hub {task}_{setting}"
                        raise BadRecordError(split, raw.index, checked, where)
                    stats.skipped[checked.reason] += 1
                    continue
                assert isinstance(checked, Record)
                row, cut = builder.build(checked, split, raw.index)
                writer.add(row)
                stats.keep(row, cut)
    report = {
        "args": {"task": task, "source": str(source), "out": str(out), "setting": setting,
                 "history_k": history_k, "retriever": retriever, "tokenizer": tokenizer_name,
                 "max_history_tokens": budgets.history, "max_query_tokens": budgets.query,
                 "max_response_tokens": budgets.response, "strict": strict, "splits": list(splits),
                 "system_prompt": system_prompt},
        "splits": {split: stats.to_dict() for split, stats in results.items()},
    }
    write_json_atomic(out / "stats.json", report)
    report["summary"] = f"{task}: " + "; ".join(f"{s} {st.summary()}" for s, st in results.items())
    return report


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
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)
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
