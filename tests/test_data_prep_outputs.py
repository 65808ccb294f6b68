"""LongLaMP prep output as one unit: all-or-nothing re-preps, --splits subsets, duplicates, overlap."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import data_prep.longlamp as longlamp
from data_prep.longlamp import main, prepare
from data_prep.output import record_key
from data_prep.sources import SourceError

REVIEW_PROFILE = [
    {"overall": 5.0, "summary": "Great mug", "description": "A ceramic mug.", "reviewText": "I love it."},
    {"overall": 2.0, "summary": "Meh kettle", "description": "Steel kettle.", "reviewText": "It whistles."},
]


def review(i: int, **changes) -> dict:
    record = {"input": f'Generate the review text written by a reviewer who has given an overall rating of '
                       f'"4.0" for a product with description "Toy {i}". The summary of the review text is "Fun".',
              "output": f"My kid loves toy {i}.", "profile": REVIEW_PROFILE, "reviewerId": f"A{i}"}
    return {**record, **changes}


def write_source(folder: Path, splits: dict[str, list]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        (folder / f"{name}.jsonl").write_text(
            "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def cli(src: Path, out: Path, *extra: str) -> int:
    return main(["--task", "product_review", "--source", str(src), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def tok():
    from flythinker_worker.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A complete previous output (3/2/2 records) made from `src`; returns src, out and its bytes."""
    src = write_source(tmp_path / "src", {"train": [review(i) for i in range(3)],
                                          "val": [review(i) for i in range(10, 12)],
                                          "test": [review(i) for i in range(20, 22)]})
    out = tmp_path / "out"
    assert cli(src, out) == 0
    return src, out, snapshot(out)


def no_temp_left(tmp_path: Path) -> bool:
    return not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("breakage", ["strict_bad_record", "invalid_json_array"])
def test_failed_reprep_leaves_previous_output_byte_identical(prepared, tmp_path, capsys, breakage):
    src, out, before = prepared
    # A new train split (so a partial publish would show), then a test split that fails the run.
    write_source(src, {"train": [review(i) for i in range(5)]})
    if breakage == "strict_bad_record":
        write_source(src, {"test": [review(20), dict(review(21), output="   ")]})
        code = cli(src, out, "--strict")
        assert "split 'test' row 1" in capsys.readouterr().err
    else:
        (src / "test.jsonl").unlink()
        (src / "test.json").write_text(json.dumps([review(20), review(21)])[:-30], encoding="utf-8")
        code = cli(src, out)
        assert "test.json: invalid JSON" in capsys.readouterr().err
    assert code == 2
    assert snapshot(out) == before
    assert no_temp_left(tmp_path) and no_temp_left(out)


def test_splits_subset_keeps_the_other_splits(prepared, tmp_path, tok):
    src, out, before = prepared
    (out / "NOTES.md").write_text("mine\n")
    (out / ".stats.json.tmp-1-dead").write_text("left by a crash")  # stale: not carried over
    previous = json.loads(before["stats.json"])
    write_source(src, {"train": [review(i) for i in range(4)]})
    stats = prepare("product_review", src, out, splits=["train"], tokenizer=tok, progress=False)
    after = snapshot(out)
    assert set(after) == {"train.parquet", "val.parquet", "test.parquet", "stats.json", "NOTES.md"}
    assert after["val.parquet"] == before["val.parquet"] and after["test.parquet"] == before["test.parquet"]
    assert pq.read_table(out / "train.parquet").num_rows == 4
    written = json.loads(after["stats.json"])
    assert written == {k: v for k, v in stats.items() if k != "summary"}
    assert written["written"] == ["train"] and written["splits"]["train"]["kept"] == 4
    assert {s: written["splits"][s] for s in ("val", "test")} == {s: previous["splits"][s] for s in ("val", "test")}
    assert written["carried_over"] == {"val": previous["args"], "test": previous["args"]}
    assert written["overlap"] == {"val/test": 0}  # kept together: the previous count still holds
    assert "val, test carried over" in stats["summary"]
    assert no_temp_left(tmp_path)
    # Re-prepare val alone: test's settings are tracked through two partial runs.
    prepare("product_review", src, out, splits=["val"], tokenizer=tok, progress=False)
    again = json.loads((out / "stats.json").read_text())
    assert again["carried_over"] == {"train": written["args"], "test": previous["args"]}


def test_kept_split_with_other_settings_warns_and_other_task_is_refused(prepared, tok, caplog):
    src, out, before = prepared
    with caplog.at_level(logging.WARNING, logger="data_prep.longlamp"):
        stats = prepare("product_review", src, out, splits=["train"], history_k=1, tokenizer=tok, progress=False)
    assert [w for w in stats["warnings"] if w.startswith("kept val.parquet was prepared with other settings: "
                                                          "history_k 2 (this run 1)")]
    assert "history_k 2 (this run 1)" in caplog.text
    before = snapshot(out)
    topic = write_source(out.parent / "topic", {"train": [{"input": "Generate the content for a reddit post \"x\".",
                                                           "output": "So.", "author": "u", "profile": []}]})
    with pytest.raises(ValueError, match="val.parquet holds task 'product_review', not 'topic_writing'"):
        prepare("topic_writing", topic, out, splits=["train"], retriever="none", tokenizer=tok, progress=False)
    assert snapshot(out) == before


def test_duplicates_are_dropped_and_counted(tmp_path, tok):
    records = [review(0), review(1), review(0),
               dict(review(0), profile=REVIEW_PROFILE[:1]),   # same user, input, output: a duplicate
               dict(review(1), output="Another text."),       # same user and input, other output: kept
               dict(review(1), reviewerId="B1"),              # another user: kept
               review(1)]
    src = write_source(tmp_path / "src", {"train": records, "val": [review(5)], "test": [review(6)]})
    stats = prepare("product_review", src, tmp_path / "out", tokenizer=tok, progress=False)
    train = stats["splits"]["train"]
    assert (train["read"], train["kept"], train["skipped"]) == (7, 4, {"duplicate": 3})
    assert [r["id"] for r in pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()] == \
        [f"product_review-train-{i}" for i in (0, 1, 4, 5)]
    assert "skipped 3: duplicate=3" in stats["summary"]
    # --strict does not stop at a duplicate: it is not a malformed record.
    stats = prepare("product_review", src, tmp_path / "strict", strict=True, tokenizer=tok, progress=False)
    assert stats["splits"]["train"]["skipped"] == {"duplicate": 3}


def test_overlap_between_splits_is_counted_and_warned(tmp_path, tok, caplog):
    src = write_source(tmp_path / "src", {
        "train": [review(i) for i in range(5)],
        "val": [review(3), review(10), dict(review(4), output="Other text.")],   # 1 shared with train
        "test": [review(0), review(1), review(10), review(11)]})                  # 2 with train, 1 with val
    with caplog.at_level(logging.WARNING, logger="data_prep.longlamp"):
        stats = prepare("product_review", src, tmp_path / "out", tokenizer=tok, progress=False)
    assert stats["overlap"] == {"train/val": 1, "train/test": 2, "val/test": 1}
    assert [stats["splits"][s]["kept"] for s in ("train", "val", "test")] == [5, 3, 4]  # reported, not dropped
    assert "2 record(s) of train are also in test" in caplog.text
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["overlap"] == stats["overlap"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_prep.longlamp"):
        assert cli(src, tmp_path / "cli") == 0  # the CLI logs them to stderr
    assert "cli: 1 record(s) of val are also in test" in caplog.text
    clean = write_source(tmp_path / "clean", {s: [review(30 + n)] for n, s in enumerate(("train", "val", "test"))})
    stats = prepare("product_review", clean, tmp_path / "clean_out", tokenizer=tok, progress=False)
    assert stats["overlap"] == {"train/val": 0, "train/test": 0, "val/test": 0} and stats["warnings"] == []


def test_record_key_is_16_bytes_and_unambiguous():
    key = record_key("A1", "q", "o")
    assert len(key) == 16 and key == record_key("A1", "q", "o")
    assert len({record_key("A1", "q", "o"), record_key("A1q", "", "o"), record_key("A", "1q", "o"),
                record_key("A1", "q\ud800", "o")}) == 4


def test_out_must_be_a_replaceable_folder(tmp_path, tok, monkeypatch):
    src = write_source(tmp_path / "src", {s: [review(1)] for s in ("train", "val", "test")})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        prepare("product_review", src, tmp_path / "file", tokenizer=tok, progress=False)
    monkeypatch.chdir(src)
    with pytest.raises(ValueError, match="working directory"):
        prepare("product_review", src, ".", tokenizer=tok, progress=False)
    assert sorted(p.name for p in src.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]


def test_shared_helpers_have_one_home(monkeypatch):
    import data_prep.rows
    import flythinker_worker.tiny
    import flythinker_worker.utils

    assert data_prep.rows.DEFAULT_SYSTEM_PROMPT is flythinker_worker.tiny.DEFAULT_SYSTEM_PROMPT
    assert longlamp.DEFAULT_SYSTEM_PROMPT is flythinker_worker.tiny.DEFAULT_SYSTEM_PROMPT
    calls = []

    def fake_load(path):
        calls.append(path)
        if path == "broken":
            raise OSError("no such folder")
        return type("Tok", (), {"chat_template": None})()

    monkeypatch.setattr(flythinker_worker.utils, "load_tokenizer", fake_load)
    with pytest.raises(SourceError, match="cannot load tokenizer 'broken': OSError: no such folder"):
        longlamp.load_tokenizer("broken")
    with pytest.raises(SourceError, match="has no chat template"):
        longlamp.load_tokenizer("plain")
    assert calls == ["broken", "plain"]
