"""LongLaMP data prep: sentence splitting, budgets, retrieval, parquet output, bad input, sources."""

from __future__ import annotations

import json
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.longlamp import BadRecordError, main, prepare
from data_prep.output import nearest_rank
from data_prep.retrieval import select_history
from data_prep.rows import Budgets
from data_prep.sources import SourceError
from data_prep.tasks import get_spec
from data_prep.text import HFTokenCounter, split_sentences, truncate

# The 14 real LongLaMP abstract-generation records (input, target), kept in the repo so no test skips.
REAL_SAMPLES = Path(__file__).resolve().parent / "fixtures" / "real_abstract_generation.jsonl"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
COLUMNS = {"id", "task", "user_id", "messages", "prompt", "response", "reference", "n_prompt_tokens",
           "n_response_tokens", "n_history_tokens", "n_query_tokens", "n_history_items"}


@pytest.fixture(scope="module")
def tok():
    from flythinker_worker.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class WordCounter:
    """A whitespace 'tokenizer' whose counts are easy to compute by hand."""

    def count(self, text: str) -> int:
        return len(text.split())

    def cut(self, text: str, n: int) -> str:
        words = list(re.finditer(r"\S+", text))
        return text[:words[n - 1].end()] if len(words) >= n else text


def real_samples() -> list[dict]:
    return [json.loads(line) for line in REAL_SAMPLES.read_text(encoding="utf-8").splitlines() if line]


# --- schema-exact raw records for the three tasks ----------------------------------------------

REVIEW_PROFILE = [
    {"overall": 5.0, "summary": "Great mug", "description": "A ceramic mug.", "reviewText": "I love it. Holds 5.0 oz."},
    {"overall": 2.0, "summary": "Meh kettle", "description": "Steel kettle.", "reviewText": "It whistles. Loud."},
    {"overall": 4.0, "summary": "Nice pan", "description": "Cast iron pan.", "reviewText": "Cooks eggs well."},
    {"overall": 3.0, "summary": "Okay lamp", "description": "Desk lamp.", "reviewText": "Bright enough."},
    {"overall": 4.0, "summary": "Fun toy", "description": "Toy set.", "reviewText": "The xylophone mallets are great."},
]
RECORDS = {
    "product_review": lambda i: {
        "input": ('Generate the review text written by a reviewer who has given an overall rating of "4.0" '
                  'for a product with description "A wooden toy with xylophone mallets". '
                  'The summary of the review text is "Fun".'),
        "output": f"My kid loves it. Record {i}, e.g. a test.", "profile": REVIEW_PROFILE,
        "reviewerId": f"A{i}"},
    "abstract_generation": lambda i: {
        "input": 'Generate an abstract for the title "Sparse tracking" using the following items: '
                 '1. Kalman filter\n2. Sparsity',
        "output": f"We track sources. Run {i} shows 5.0 dB gains.", "name": f"Ada {i}",
        "profile": [{"title": "Kalman filter tracking", "abstract": "We use a Kalman filter.", "id": "a1", "year": 2015},
                    {"title": "Graph learning", "abstract": "Graphs help.", "id": "a2", "year": 2019},
                    {"title": "Old work", "abstract": "Sparsity matters.", "id": "a3"}]},
    "topic_writing": lambda i: {
        "input": 'Generate the content for a reddit post "My first sourdough loaf".',
        "output": f"So I baked bread. Post {i} tbh.", "author": f"user_{i}",
        "profile": [{"summary": "Sourdough starter help", "content": "My starter died.", "id": "x1", "author": f"user_{i}"},
                    {"summary": "Running shoes", "content": "New shoes rock.", "id": "x2", "author": f"user_{i}"}]},
}


def write_split(folder: Path, name: str, records: list, ext: str = ".jsonl") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if ext == ".jsonl":
        (folder / f"{name}.jsonl").write_text("".join(
            (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    elif ext == ".json":
        (folder / f"{name}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), folder / f"{name}.parquet")


def write_task(folder: Path, task: str, n: int = 3, val_name: str = "val", ext: str = ".jsonl") -> Path:
    for split in ("train", val_name, "test"):
        write_split(folder, split, [RECORDS[task](i) for i in range(n)], ext)
    return folder


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# --- sentence splitting ------------------------------------------------------------------------

def test_split_keeps_decimals_abbreviations_initials():
    text = ("It costs 5.0 dollars, e.g. in the U.S. today. Dr. Smith et al. agree. No. 5 is fine. "
            "I said no. Then J. Smith left... and came back! Really?! Results rose in 2019. Yes.")
    assert split_sentences(text) == [
        "It costs 5.0 dollars, e.g. in the U.S. today. ", "Dr. Smith et al. agree. ", "No. 5 is fine. ",
        "I said no. ", "Then J. Smith left... and came back! ", "Really?! ", "Results rose in 2019. ", "Yes."]


def test_split_lists_and_bullets():
    assert split_sentences("Items: 1. Alpha\n2. Beta\n3. Gamma") == ["Items: 1. Alpha\n", "2. Beta\n", "3. Gamma"]
    assert split_sentences("•One thing.•Two things.") == ["•One thing.", "•Two things."]
    assert split_sentences('He said "stop." Then left.') == ['He said "stop." ', "Then left."]


def test_split_real_samples():
    samples = real_samples()
    assert len(samples) == 14
    for record in samples:
        for text in (record["input"], record["target"]):
            assert "".join(split_sentences(text)) == text
    by_title = {re.search(r'title "([^"]+)"', r["input"]).group(1): r for r in samples}
    # Counted by hand from the texts.
    doa = by_title["2-D DOA tracking using variational sparse Bayesian learning embedded with Kalman filter"]
    assert len(split_sentences(doa["target"])) == 7
    german = by_title["Moderne Vertrauensdienste für vertrauenswürdige Transaktionen."]
    assert len(split_sentences(german["target"])) == 2  # hard-wrapped lines are not sentence ends
    bullets = split_sentences(by_title["A binary-constrained Geometric Semantic Genetic Programming for "
                                       "feature selection purposes."]["target"])
    assert len(bullets) == 5 and all(piece.startswith("•") for piece in bullets)
    survey = split_sentences(by_title["A survey on feature extraction for pattern recognition"]["input"])
    assert survey[0].endswith("items: 1. Pattern recognition \n")
    assert survey[1:] == ["2. Feature extraction \n", "3. Linear and nonlinear \n", "4. Frontier methods \n",
                          "5. Development tendency"]
    expertise = split_sentences(by_title["Why Expertise Matters: A Response to the Challenges."]["target"])
    assert expertise[-1] == "Although each of these communities..."


# --- truncation --------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, expected, cut", [
    (9, "One two three. Four five. Six seven eight nine.", False),  # exactly fits: nothing dropped
    (8, "One two three. Four five.", True),
    (5, "One two three. Four five.", True),
    (4, "One two three.", True),
    (3, "One two three.", True),
    (2, "One two", True),  # first sentence too long: token-level cut
])
def test_truncate_keeps_longest_sentence_prefix(budget, expected, cut):
    result = truncate("One two three. Four five. Six seven eight nine.", budget, WordCounter())
    assert (result.text, result.n_tokens, result.cut) == (expected, len(expected.split()), cut)


@pytest.mark.parametrize("budget", [12, 40, 90])
def test_truncate_real_targets_smallest_cut(tok, budget):
    counter = HFTokenCounter(tok)
    for record in real_samples():
        target = record["target"]
        result = truncate(target, budget, counter)
        assert result.n_tokens == n_tokens(tok, result.text) <= budget
        assert result.text and target.strip().startswith(result.text)
        pieces = split_sentences(target)
        prefixes = ["".join(pieces[:n]).strip() for n in range(1, len(pieces) + 1)]
        if result.text in prefixes:  # a sentence cut: the next sentence must not have fitted
            n = prefixes.index(result.text)
            if n + 1 < len(prefixes):
                assert n_tokens(tok, prefixes[n + 1]) > budget
        else:  # a token cut happens only when the first sentence alone is over budget
            assert n_tokens(tok, prefixes[0]) > budget
        if n_tokens(tok, target.strip()) <= budget:
            assert result.text == target.strip() and not result.cut


def test_token_cut_of_multibyte_text_holds_budget(tok):
    text = "Vertrauenswürdige Abwicklung elektronischer Transaktionen für die Öffentlichkeit"
    for budget in range(1, 12):
        result = truncate(text, budget, HFTokenCounter(tok))
        assert 0 < n_tokens(tok, result.text) <= budget and text.startswith(result.text)


def test_real_samples_through_prepare(tmp_path, tok):
    records = [{"input": r["input"], "output": r["target"], "profile": [], "name": f"author {i}"}
               for i, r in enumerate(real_samples())]
    src = tmp_path / "src"
    for split in ("train", "val", "test"):
        write_split(src, split, records)
    stats = prepare("abstract_generation", src, tmp_path / "out", retriever="none", tokenizer=tok,
                    budgets=Budgets(history=50, query=25, response=40), progress=False)
    assert stats["splits"]["val"]["kept"] == 14
    for row, record in zip(read_rows(tmp_path / "out" / "val.parquet"), records):
        assert row["reference"] == record["output"]
        assert record["output"].startswith(row["response"]) and row["response"]
        assert n_tokens(tok, row["response"]) == row["n_response_tokens"] <= 40
        query = row["prompt"][-1]["content"]
        assert query and record["input"].startswith(query)  # no history: the user turn is the query
        assert n_tokens(tok, query) == row["n_query_tokens"] <= 25


# --- retrieval ---------------------------------------------------------------------------------

def test_bm25_picks_item_sharing_rare_words():
    spec = get_spec("product_review")
    query = RECORDS["product_review"](0)["input"]
    assert select_history(REVIEW_PROFILE, query, spec, 1, "bm25") == [REVIEW_PROFILE[4]]
    assert select_history(REVIEW_PROFILE, query, spec, 2, "bm25")[0] is REVIEW_PROFILE[4]


def test_bm25_ties_keep_profile_order():
    items = [dict(REVIEW_PROFILE[2], summary=f"same{i}") for i in range(4)]
    assert select_history(items, "nothing shared", get_spec("product_review"), 3, "bm25") == items[:3]


def test_recent_and_none():
    assert select_history(REVIEW_PROFILE, "q", get_spec("product_review"), 2, "recent") == \
        [REVIEW_PROFILE[4], REVIEW_PROFILE[3]]
    abstracts = [{"title": "a", "abstract": "a", "year": 2010}, {"title": "b", "abstract": "b", "year": 2015},
                 {"title": "c", "abstract": "c"}, {"title": "d", "abstract": "d", "year": "2012"}]
    picked = select_history(abstracts, "q", get_spec("abstract_generation"), 3, "recent")
    assert [p["title"] for p in picked] == ["b", "d", "a"]
    assert select_history(REVIEW_PROFILE, "q", get_spec("product_review"), 2, "none") == []


# --- prepare: output format --------------------------------------------------------------------

RENDERED = {
    "product_review": '"4.0" is a rating for the product with description "Toy set.". "Fun toy" is summary '
                      'for "The xylophone mallets are great."',
    "abstract_generation": '"We use a Kalman filter." is the abstract for the title "Kalman filter tracking"',
    "topic_writing": '"Sourdough starter help" is a summary for "My starter died."',
}


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_prepare_rows_for_each_task(tmp_path, tok, task):
    src = write_task(tmp_path / "src", task)
    stats = prepare(task, src, tmp_path / "out", history_k=1, tokenizer=tok, progress=False)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"train.parquet", "val.parquet", "test.parquet",
                                                               "stats.json"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == \
        {k: v for k, v in stats.items() if k != "summary"}
    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert set(table.column_names) == COLUMNS
    for i, row in enumerate(table.to_pylist()):
        raw = RECORDS[task](i)
        assert row["id"] == f"{task}-train-{i}" and row["task"] == task
        assert row["user_id"] == raw[get_spec(task).user_key]
        # No system turn by default: the tokenizer's chat template supplies its own (test below).
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["prompt"] == row["messages"][:1]
        assert row["response"] == row["messages"][1]["content"] == raw["output"] == row["reference"]
        user = row["prompt"][0]["content"]
        # The BM25 pick (the one item sharing the query's rare words), then the bridge and query.
        assert user == f"{RENDERED[task]}\n\n{get_spec(task).bridge}{raw['input']}"
        # Count the chat template written out by hand: a second path to n_prompt_tokens.
        templated = f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert row["n_prompt_tokens"] == len(tok(templated, add_special_tokens=False)["input_ids"])
        assert row["n_response_tokens"] == n_tokens(tok, raw["output"])
        assert row["n_history_tokens"] == n_tokens(tok, RENDERED[task]) and row["n_history_items"] == 1


def test_system_prompt_defaults_to_the_chat_templates_own(tmp_path, tok):
    src = write_task(tmp_path / "src", "product_review", n=3)
    stats = prepare("product_review", src, tmp_path / "default", tokenizer=tok, progress=False)
    assert stats["args"]["system_prompt"] is None
    for row in pq.read_table(tmp_path / "default" / "test.parquet").to_pylist():
        assert all(m["role"] != "system" for m in row["messages"] + row["prompt"])
        # The chat-templated prompt is the tokenizer's own default rendering: its default system turn
        # (Qwen2.5's template inserts "You are Qwen, created by Alibaba Cloud. ..." the same way).
        rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert rendered == f"{SYSTEM}<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
        assert rendered.count("<|im_start|>system") == 1
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert row["n_prompt_tokens"] == len(ids)
    # --system-prompt TEXT forces an explicit system turn, which replaces the template's default.
    assert main(["--task", "product_review", "--source", str(src), "--out", str(tmp_path / "forced"),
                 "--system-prompt", "Write like the user.", "--no-progress"]) == 0
    for row in pq.read_table(tmp_path / "forced" / "test.parquet").to_pylist():
        assert row["prompt"][0] == {"role": "system", "content": "Write like the user."}
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert rendered.startswith("<|im_start|>system\nWrite like the user.<|im_end|>\n")
        assert "You are a helpful assistant." not in rendered
    assert json.loads((tmp_path / "forced" / "stats.json").read_text())["args"]["system_prompt"] == \
        "Write like the user."


def test_nearest_rank_known_values():
    hist = Counter(range(1, 101))
    assert [nearest_rank(hist, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert nearest_rank(Counter({3: 1, 10: 3}), 25) == 3 and nearest_rank(Counter({3: 1, 10: 3}), 26) == 10
    assert nearest_rank(Counter(), 50) == 0


def test_deterministic_and_streamed_in_row_groups(tmp_path, tok):
    src = write_task(tmp_path / "src", "product_review", n=7)
    for out in ("a", "b"):
        prepare("product_review", src, tmp_path / out, tokenizer=tok, progress=False, batch_rows=2)
    for split in ("train", "val", "test"):
        a, b = (pq.read_table(tmp_path / out / f"{split}.parquet") for out in ("a", "b"))
        assert a.equals(b) and a.num_rows == 7
    assert pq.ParquetFile(tmp_path / "a" / "train.parquet").num_row_groups == 4  # 2+2+2+1 rows
    a, b = (json.loads((tmp_path / out / "stats.json").read_text()) for out in ("a", "b"))
    assert a["args"].pop("out") != b["args"].pop("out") and a == b


# --- sources -----------------------------------------------------------------------------------

@pytest.mark.parametrize("val_name, ext", [("validation", ".jsonl"), ("val", ".json"), ("validation", ".parquet")])
def test_source_formats_and_val_names_give_same_rows(tmp_path, tok, val_name, ext):
    reference = write_task(tmp_path / "ref", "abstract_generation", n=4)
    other = write_task(tmp_path / "other", "abstract_generation", n=4, val_name=val_name, ext=ext)
    for src, out in ((reference, "ref_out"), (other, "other_out")):
        prepare("abstract_generation", src, tmp_path / out, tokenizer=tok, progress=False)
    for split in ("train", "val", "test"):
        assert read_rows(tmp_path / "ref_out" / f"{split}.parquet") == \
            read_rows(tmp_path / "other_out" / f"{split}.parquet")


def test_json_streams_across_chunk_boundaries(tmp_path, monkeypatch):
    import data_prep.sources as sources

    records = [RECORDS["topic_writing"](i) for i in range(4)] + [{"input": "Grüße, 5.0 ünï", "n": 12345}]
    (tmp_path / "array.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    (tmp_path / "broken.json").write_text(json.dumps(records)[:-40])
    monkeypatch.setattr(sources, "_JSON_CHUNK", 7)  # many refills, multi-byte characters split across reads
    for name in ("array", "lines"):
        rows = list(sources.iter_local([tmp_path / f"{name}.json"], name, progress=False))
        assert [r.value for r in rows] == records and [r.index for r in rows] == list(range(5))
    with pytest.raises(SourceError, match="broken.json: invalid JSON"):
        list(sources.iter_local([tmp_path / "broken.json"], "broken", progress=False))


def test_missing_or_ambiguous_split_is_a_clear_error(tmp_path, tok):
    src = write_task(tmp_path / "src", "topic_writing")
    write_split(src, "validation", [RECORDS["topic_writing"](0)])
    with pytest.raises(SourceError, match="ambiguous.*val.jsonl, validation.jsonl"):
        prepare("topic_writing", src, tmp_path / "out", tokenizer=tok, progress=False)
    (src / "test.jsonl").unlink()
    with pytest.raises(SourceError, match="no file for split 'test'"):
        prepare("topic_writing", src, tmp_path / "out", tokenizer=tok, progress=False, splits=["train", "test"])
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are all found


def test_hub_unreachable_is_a_clear_error(tmp_path, tok, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'LongLaMP/LongLaMP' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(SourceError, match=r"LongLaMP/LongLaMP config 'topic_writing_user'.*--source PATH"):
        prepare("topic_writing", "hub", tmp_path / "out", tokenizer=tok, progress=False)
    assert not (tmp_path / "out").exists()


def test_hub_streams_records(tmp_path, tok, monkeypatch):
    calls = []

    def fake_load(repo, name, split, streaming):
        calls.append((repo, name, split, streaming))
        if split == "val":
            raise ValueError("Bad split: val. Available splits: ['train', 'validation', 'test']")
        return iter([RECORDS["topic_writing"](i) for i in range(2)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    stats = prepare("topic_writing", "hub", tmp_path / "out", setting="temporal", tokenizer=tok, progress=False)
    assert [s["kept"] for s in stats["splits"].values()] == [2, 2, 2]
    assert ("LongLaMP/LongLaMP", "topic_writing_temporal", "validation", True) in calls


# --- bad records -------------------------------------------------------------------------------

def bad_records() -> tuple[list, dict]:
    good = RECORDS["product_review"]
    records = [
        good(0),
        "{not json",
        {k: v for k, v in good(1).items() if k != "output"},
        dict(good(2), output=17),
        dict(good(3), output="   "),
        dict(good(4), profile=[]),
        dict(good(5), profile="not a list"),
        dict(good(6), profile=[{"overall": 5.0, "summary": "x", "description": "y"}]),
        dict(good(7), profile=[dict(REVIEW_PROFILE[0], overall=True)]),
        {k: v for k, v in good(8).items() if k != "reviewerId"},
        dict(good(9), input=""),
        ["a", "list"],
        good(10),
    ]
    expected = {"invalid_json": 1, "missing_field:output": 1, "wrong_type:output": 1, "empty_output": 1,
                "empty_profile": 1, "wrong_type:profile": 1, "bad_profile_item": 2,
                "missing_field:reviewerId": 1, "empty_input": 1, "not_an_object": 1}
    return records, expected


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
    records, expected = bad_records()
    src = tmp_path / "src"
    for split in ("train", "val", "test"):
        write_split(src, split, records)
    stats = prepare("product_review", src, tmp_path / "out", tokenizer=tok, progress=False)
    assert stats["splits"]["val"]["skipped"] == expected
    assert (stats["splits"]["val"]["read"], stats["splits"]["val"]["kept"]) == (13, 2)
    assert [r["id"] for r in read_rows(tmp_path / "out" / "val.parquet")] == \
        ["product_review-val-0", "product_review-val-12"]
    assert "skipped 11" in stats["summary"] and "empty_profile=1" in stats["summary"]
    # The non-personalized baseline never reads the profile: empty/defective profiles are fine there.
    stats = prepare("product_review", src, tmp_path / "none", retriever="none", tokenizer=tok, progress=False)
    assert stats["splits"]["val"]["kept"] == 5 and "empty_profile" not in stats["splits"]["val"]["skipped"]


def test_strict_stops_at_first_bad_record_and_leaves_no_partial_file(tmp_path, tok, capsys):
    good = RECORDS["product_review"]
    src = tmp_path / "src"
    write_split(src, "train", [good(0), good(1)])
    write_split(src, "val", [good(0), good(1), good(2), dict(good(3), profile=[{"summary": "s"}])])
    write_split(src, "test", [good(0)])
    with pytest.raises(BadRecordError, match=r"split 'val' row 3 .*field 'profile\[0\]\.overall'") as err:
        prepare("product_review", src, tmp_path / "out", tokenizer=tok, progress=False, strict=True,
                batch_rows=1)
    assert (err.value.split, err.value.index) == ("val", 3)
    # All or nothing: train was complete, but a failed run publishes no file (and leaves no temp folder).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    code = main(["--task", "product_review", "--source", str(src), "--out", str(tmp_path / "cli"), "--strict",
                 "--no-progress"])
    assert code == 2 and "split 'val' row 3" in capsys.readouterr().err
