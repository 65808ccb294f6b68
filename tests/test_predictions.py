"""Predictions files: repeated ids are refused with a count (or deduplicated on request); the writer
repairs a torn tail and never writes an id twice."""

import json

import pytest

from evaluation.predictions import InputError, PredictionWriter, load_predictions


def write_rows(path, ids):
    path.write_text("".join(json.dumps({"id": i, "prediction": f"p{n}", "reference": "r"}) + "\n"
                            for n, i in enumerate(ids)))


def test_repeated_ids_are_refused_with_a_count(tmp_path):
    path = tmp_path / "p.jsonl"
    write_rows(path, ["a", "b", "a", "c", "b", "a"])
    with pytest.raises(InputError, match=r"3 rows repeat an id \(2 ids, e\.g\. \['a', 'b'\]\)"):
        load_predictions(path)
    rows = load_predictions(path, dedup=True)
    assert [(r["id"], r["prediction"]) for r in rows] == [("a", "p0"), ("b", "p1"), ("c", "p3")]


def test_writer_repairs_a_torn_tail_and_refuses_a_second_id(tmp_path):
    path = tmp_path / "p.jsonl"
    write_rows(path, ["a", "b"])
    with open(path, "a") as f:
        f.write('{"id": "c", "predic')  # killed mid-write
    with PredictionWriter(path) as writer:
        assert writer.done == {"a", "b"}
        writer.write([{"id": "c", "prediction": "x", "reference": "r"}])
        with pytest.raises(ValueError, match="'a' is already in"):
            writer.write([{"id": "a", "prediction": "x", "reference": "r"}])
    assert [r["id"] for r in load_predictions(path)] == ["a", "b", "c"]


def test_a_resumed_file_keeps_the_engine_it_was_started_with(tmp_path):
    """A setting known only once workers start (the resolved decoding engine) is pinned in the meta file:
    a resume that resolves another one is refused, the same one (or a fresh file) goes on, and the pinned
    value survives the settings check of every reopening."""
    path, settings = tmp_path / "p.jsonl", {"model": "m", "seed": 1}
    with PredictionWriter(path, settings) as writer:
        writer.pin("engine_used", ["vllm"])
        writer.write([{"id": "a", "prediction": "x", "reference": "r"}])
    with PredictionWriter(path, settings) as writer:
        writer.pin("engine_used", ["vllm"])
    with PredictionWriter(path, settings) as writer:
        with pytest.raises(ValueError, match=r"engine_used=\['vllm'\], this run resolves \['flythinker'\]"):
            writer.pin("engine_used", ["flythinker"])
    with pytest.raises(ValueError, match="other settings"):
        PredictionWriter(path, {"model": "m", "seed": 2})
    with PredictionWriter(path, settings, overwrite=True) as writer:
        writer.pin("engine_used", ["flythinker"])  # started over: nothing written with vllm
    assert json.loads((tmp_path / "p.jsonl.meta.json").read_text())["pinned"] == {"engine_used": ["flythinker"]}
