"""Synthetic LongLaMP: exact schema, determinism, split layout, and a real personalization signal."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from statistics import mean

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.longlamp import prepare
from data_prep.rows import Budgets
from data_prep.synthetic import iter_texts, main, make_users, write_synthetic
from data_prep.tasks import get_spec

TASKS = ("product_review", "abstract_generation", "topic_writing")
# LongLaMP's raw schema (../shared/DESIGN.md section 4), written out independently of the code.
RECORD_KEYS = {"product_review": {"input", "output", "profile", "reviewerId"},
               "abstract_generation": {"input", "output", "profile", "name"},
               "topic_writing": {"input", "output", "profile", "author"}}
ITEM_KEYS = {"product_review": {"overall", "summary", "description", "reviewText"},
             "abstract_generation": {"title", "abstract", "id", "year"},
             "topic_writing": {"summary", "content", "id", "author"}}
QUERY = {"product_review": re.compile(r'^Generate the review text written by a reviewer who has given an overall '
                                      r'rating of "[1-5]\.0" for a product with description ".+"\. The summary '
                                      r'of the review text is ".+"\.$', re.S),
         "abstract_generation": re.compile(r'^Generate an abstract for the title ".+" using the following items: .+',
                                           re.S),
         "topic_writing": re.compile(r'^Generate the content for a reddit post ".+"\.$')}


@pytest.fixture(scope="module")
def tok():
    from flythinker_worker.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    write_synthetic(out)
    return out


@pytest.fixture(scope="module")
def prepared(synthetic, tok, tmp_path_factory) -> dict[str, Path]:
    """The default synthetic data through LongLaMP prep with the paper's setting (BM25, k=2)."""
    root = tmp_path_factory.mktemp("prepared")
    for task in TASKS:
        stats = prepare(task, synthetic / task, root / task, tokenizer=tok, progress=False)
        assert all(s["kept"] == s["read"] for s in stats["splits"].values()), stats
    return {task: root / task for task in TASKS}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("task", TASKS)
def test_exact_longlamp_schema(synthetic, task):
    for split in ("train", "val", "test"):
        for record in load(synthetic / task / f"{split}.jsonl"):
            assert set(record) == RECORD_KEYS[task]
            assert QUERY[task].match(record["input"]), record["input"]
            assert isinstance(record["output"], str) and 20 <= len(record["output"].split()) <= 160
            assert 4 <= len(record["profile"]) <= 8
            for item in record["profile"]:
                assert set(item) == ITEM_KEYS[task]
                assert all(isinstance(item[k], str) for k in ITEM_KEYS[task] - {"overall", "year"})
            if task == "product_review":
                assert all(isinstance(i["overall"], float) and 1 <= i["overall"] <= 5 for i in record["profile"])
            if task == "abstract_generation":
                assert all(isinstance(i["year"], int) for i in record["profile"])
            if task == "topic_writing":
                assert all(i["author"] == record["author"] for i in record["profile"])


def test_defaults_small_user_split_and_deterministic(synthetic, tmp_path):
    for task in TASKS:
        splits = {s: load(synthetic / task / f"{s}.jsonl") for s in ("train", "val", "test")}
        assert [len(v) for v in splits.values()] == [64, 16, 16]  # 24 users x 4 records: 16/4/4 users
        key = next(iter(RECORD_KEYS[task] - {"input", "output", "profile"}))
        users = {s: {r[key] for r in v} for s, v in splits.items()}
        assert [len(u) for u in users.values()] == [16, 4, 4]
        assert not (users["train"] & users["val"]) and not (users["train"] & users["test"])
    write_synthetic(tmp_path / "again")
    write_synthetic(tmp_path / "seed1", seed=1)
    for task in TASKS:
        same = (synthetic / task / "train.jsonl").read_bytes()
        assert (tmp_path / "again" / task / "train.jsonl").read_bytes() == same
        assert (tmp_path / "seed1" / task / "train.jsonl").read_bytes() != same


def test_temporal_setting_puts_every_user_in_every_split(tmp_path):
    write_synthetic(tmp_path, users=5, records_per_user=4, setting="temporal", tasks=["topic_writing"])
    splits = {s: load(tmp_path / "topic_writing" / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [10, 5, 5]
    assert len({frozenset(r["author"] for r in v) for v in splits.values()}) == 1


def test_users_have_consistent_traits(synthetic):
    users = {u.user_id: u for u in make_users("product_review", 24, 0)}
    assert len({u.signature for u in users.values()}) == 24
    ratings: dict[str, list[float]] = {}
    for split in ("train", "val", "test"):
        for record in load(synthetic / "product_review" / f"{split}.jsonl"):
            ratings.setdefault(record["reviewerId"], []).extend(i["overall"] for i in record["profile"])
    # Rating habit: each user's ratings sit near their own mean, and users differ.
    for user_id, values in ratings.items():
        assert abs(mean(values) - users[user_id].mean_rating) < 1.0
    assert max(mean(v) for v in ratings.values()) - min(mean(v) for v in ratings.values()) > 2.0


@pytest.mark.parametrize("task", TASKS)
def test_history_carries_the_users_signal(prepared, task):
    """The retrieved history shares the user's signature phrase (and vocabulary) with the target far
    more often than another user's history does: a model that reads history can do better."""
    signature = {u.user_id: u.signature for u in make_users(task, 24, 0)}
    rows = [r for s in ("train", "val", "test") for r in pq.read_table(prepared[task] / f"{s}.parquet").to_pylist()]
    rng = random.Random(0)
    own_sig, other_sig, target_sig, own_overlap, other_overlap = 0, 0, 0, [], []
    for row in rows:
        history = row["prompt"][-1]["content"].lower()
        other = rng.choice([r for r in rows if r["user_id"] != row["user_id"]])
        other_history = other["prompt"][-1]["content"].lower()
        own_sig += signature[row["user_id"]] in history
        other_sig += signature[row["user_id"]] in other_history
        target_sig += signature[row["user_id"]] in row["reference"].lower()
        target = words(row["reference"])
        own_overlap.append(len(target & words(history)) / len(target))
        other_overlap.append(len(target & words(other_history)) / len(target))
    n = len(rows)
    assert own_sig / n >= 0.9 and other_sig / n <= 0.02
    assert 0.75 <= target_sig / n <= 1.0  # ~90% of texts carry the signature
    assert mean(own_overlap) > mean(other_overlap) + 0.1


def test_bm25_history_is_on_topic(synthetic):
    """Users review mostly within two favourite categories; BM25's first pick shares the query's
    category far more often than a random profile item does (the chance rate)."""
    from data_prep import synthetic_vocab as vocab
    from data_prep.retrieval import select_history
    from data_prep.tasks import get_spec

    category = {p: c for c, d in vocab.PRODUCT_CATEGORIES.items() for p in d["products"]}
    product = lambda description: category[re.search(r'^\W?\w+ (.+?) made of', description).group(1)]
    picked, chance = [], []
    for record in load(synthetic / "product_review" / "train.jsonl"):
        wanted = product(re.search(r'description "(.+?)"\.', record["input"]).group(1))
        items = [product(i["description"]) for i in record["profile"]]
        if wanted not in items:
            continue
        top = select_history(record["profile"], record["input"], get_spec("product_review"), 1, "bm25")[0]
        picked.append(product(top["description"]) == wanted)
        chance.append(items.count(wanted) / len(items))
    assert len(picked) > 30 and mean(picked) > mean(chance) + 0.15 and mean(picked) > 0.7


def test_iter_texts_and_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--users", "6", "--texts-out", str(tmp_path / "texts.jsonl")]) == 0
    assert "product_review: train 16, val 4, test 4" in capsys.readouterr().out
    texts = [json.loads(line)["input"] for line in (tmp_path / "texts.jsonl").read_text().splitlines()]
    assert texts == list(iter_texts(users=6))
    counts = Counter(texts)
    assert counts["You are a helpful assistant."] == 1 and "Following the given patterns, " in counts
    for task in TASKS:
        for record in load(tmp_path / "d" / task / "train.jsonl"):
            assert record["output"] in counts and record["input"] in counts
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "bad"), "--users", "2"])
    assert exc.value.code == 2


def test_budgets_hold_on_synthetic(tmp_path, tok):
    write_synthetic(tmp_path / "syn", users=6, records_per_user=3, tasks=["abstract_generation"])
    budgets = Budgets(history=60, query=20, response=30)
    stats = prepare("abstract_generation", tmp_path / "syn" / "abstract_generation", tmp_path / "out",
                    history_k=4, tokenizer=tok, budgets=budgets, progress=False)
    rows = read_rows(tmp_path / "out" / "train.parquet")
    assert rows and stats["splits"]["train"]["truncated"]["response"] > 0
    for row in rows:
        user = row["prompt"][-1]["content"]
        history, query = user.split("\n\n" + get_spec("abstract_generation").bridge)
        assert 0 < n_tokens(tok, history) == row["n_history_tokens"] <= 60
        assert 0 < n_tokens(tok, query) == row["n_query_tokens"] <= 20
        assert 0 < n_tokens(tok, row["response"]) == row["n_response_tokens"] <= 30
        assert row["reference"].startswith(row["response"]) and len(row["reference"]) > len(row["response"])
    # stats percentiles agree with numpy's nearest-rank ("inverted_cdf") over the written rows.
    lengths = [r["n_prompt_tokens"] for r in rows]
    got = stats["splits"]["train"]["tokens"]["prompt"]
    assert got == {"p50": int(np.percentile(lengths, 50, method="inverted_cdf")),
                   "p90": int(np.percentile(lengths, 90, method="inverted_cdf")),
                   "p99": int(np.percentile(lengths, 99, method="inverted_cdf")), "max": max(lengths)}



def test_cli_on_synthetic_data(tmp_path):
    root = Path(__file__).resolve().parents[1]
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=root, capture_output=True,
                                       text=True, timeout=300)
    made = run("data_prep.synthetic", "--out", str(tmp_path / "syn"), "--users", "6")
    assert made.returncode == 0, made.stderr
    done = run("data_prep.longlamp", "--task", "topic_writing", "--source", str(tmp_path / "syn" / "topic_writing"),
               "--out", str(tmp_path / "out"), "--history-k", "3", "--max-response-tokens", "50")
    assert done.returncode == 0, done.stderr
    assert re.search(r"topic_writing: train kept 16/16; val kept 4/4; test kept 4/4", done.stdout)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["args"]["history_k"] == 3 and stats["args"]["max_response_tokens"] == 50
    assert stats["splits"]["test"]["tokens"]["response"]["max"] <= 50


def test_task_folder_is_replaced_as_a_whole(tmp_path, monkeypatch):
    import data_prep.synthetic as synthetic

    write_synthetic(tmp_path, users=3, records_per_user=3, tasks=["topic_writing"])
    folder = tmp_path / "topic_writing"
    (folder / "validation.jsonl").write_text("stale\n")  # would make `val` ambiguous for data_prep.longlamp
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def failing(path, text):
        if Path(path).name == "test.jsonl":
            raise OSError(28, "No space left on device")
        real_write(path, text)

    real_write = synthetic.write_text_atomic
    monkeypatch.setattr(synthetic, "write_text_atomic", failing)
    with pytest.raises(OSError):
        write_synthetic(tmp_path, users=3, records_per_user=3, seed=1, tasks=["topic_writing"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the failed run changed nothing
    monkeypatch.setattr(synthetic, "write_text_atomic", real_write)
    write_synthetic(tmp_path, users=3, records_per_user=3, tasks=["topic_writing"])
    assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topic_writing"]  # no temp folder left
