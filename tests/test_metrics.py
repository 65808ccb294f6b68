"""evaluation.metrics / bertscore / report against independent computations: the libraries called directly, hand-computed values,
exact position segments, BERTScore by hand on tiny random-init encoders, the CLI's artefacts, bad input.

METEOR needs WordNet + punkt_tab (scripts/install_wordnet.sh, run by scripts/setup.sh): without them the
METEOR tests fail with that instruction, on purpose, rather than skip.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nltk
import pytest
import sacrebleu
import torch
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer

from flythinker_worker.tiny import TOKENIZER_DIR, load_tiny_tokenizer
from evaluation.bertscore import bertscore_samples
from evaluation.metrics import MissingNltkData, compute_metrics, position_segments, require_nltk_data
from evaluation.predictions import InputError, load_predictions
from evaluation.report import main

REPO = Path(__file__).resolve().parents[1]
PAIRS = [  # (prediction, reference): several sentences, punctuation, repeats, an empty prediction
    ("The cat sat on the mat. It was happy!", "A cat was sitting on the mat. It looked happy."),
    ("This paper proposes a new method for DOA tracking. Results show gains.",
     "In this paper, we consider the 2-D DOA tracking problem. Simulations show the gains."),
    ("great product, works well and arrived early", "Works great. Arrived two days early, would buy again."),
    ("", "An empty prediction still counts as a sample."),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def test_nltk_data_installed():
    """Fails (never skips) with 'run bash scripts/install_wordnet.sh' when WordNet/punkt_tab are missing."""
    require_nltk_data()


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
    meteor = [single_meteor_score(nltk.word_tokenize(r), nltk.word_tokenize(p), alpha=0.9, beta=3, gamma=0.5)
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


# --- BERTScore on tiny random-init encoders -------------------------------------------------------

def _save_tiny_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    tok = load_tiny_tokenizer()
    tok.model_max_length = 512  # within the model's position table
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_tiny_roberta(path: Path) -> Path:
    """RoBERTa layout (<s> ... </s>, byte-level BPE) from the tiny tokenizer's vocab and merges."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    spec = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["model"]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    RobertaTokenizer(vocab=vocab, merges=[tuple(m) for m in spec["merges"]],
                     model_max_length=512).save_pretrained(path)
    torch.manual_seed(1)
    RobertaModel(RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=514,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _save_tiny_bert(tmp_path_factory.mktemp("bertscore") / "tiny-bert")


def _hand_bertscore(model_dir, pred, ref, layer, prefix="", special=()):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    def embed(text):
        ids = tok(prefix + text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        keep = torch.tensor([i not in special for i in ids])
        return h / h.norm(dim=-1, keepdim=True), keep

    (h, hk), (r, rk) = embed(pred), embed(ref)
    sim = h @ r.T  # every token matched greedily to its most similar token on the other side
    p, rec = sim.max(1).values[hk].mean().item(), sim.max(0).values[rk].mean().item()
    return 100 * p, 100 * rec, 100 * 2 * p * rec / (p + rec)


def test_bertscore_identical_is_one_and_matches_hand_computation(tiny_bert):
    same = bertscore_samples(["the cat sat on the mat"], ["the cat sat on the mat"], str(tiny_bert))
    assert same["status"] == "ok" and same["num_layers"] == 3  # default: the model's last layer
    for k in ("precision", "recall", "f1"):
        assert same[k][0] == pytest.approx(100.0, abs=1e-3)  # 1e-5 as a fraction
    preds = ["the cat sat on the mat today", "hello", "", "long " * 30 + "words"]
    refs = ["the cat sat on the mat", "hello world, how are you?", "an empty prediction", "short"]
    got = bertscore_samples(preds, refs, str(tiny_bert), num_layers=1, batch_size=2)  # padded batches
    assert got["num_layers"] == 1
    for i, (p, r) in enumerate(zip(preds, refs)):
        want = (0.0, 0.0, 0.0) if not p else _hand_bertscore(tiny_bert, p, r, layer=1)
        assert (got["precision"][i], got["recall"][i], got["f1"][i]) == pytest.approx(want, abs=1e-4)
    assert 0 < got["f1"][0] < 100


def test_bertscore_roberta_layout(tmp_path):
    # <s>/</s> weigh 0 and the text gets RoBERTa's prefix space, as bert-score does for roberta-large.
    model_dir = _save_tiny_roberta(tmp_path / "tiny-roberta")
    pred, ref = "the dog ran home", "a dog walked home quickly"
    got = bertscore_samples([pred], [ref], str(model_dir))
    want = _hand_bertscore(model_dir, pred, ref, layer=2, prefix=" ", special=(0, 2))
    assert (got["precision"][0], got["recall"][0], got["f1"][0]) == pytest.approx(want, abs=1e-4)


def test_bertscore_unavailable_is_explicit(tmp_path):
    for model in (None, "none", "None"):
        out = bertscore_samples(["a"], ["a"], model)
        assert out == {"status": "unavailable", "reason": out["reason"]} and "roberta-large" in out["reason"]
    out = bertscore_samples(["a"], ["a"], str(tmp_path / "no-such-model"))
    assert out["status"] == "unavailable" and "no-such-model" in out["reason"]


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


def test_cli_writes_every_artefact_for_two_systems(tmp_path, tiny_bert):
    a = _write_jsonl(tmp_path / "flythinker.jsonl", _rows(0))
    b = _write_jsonl(tmp_path / "baseline.jsonl", _rows(1))
    out = tmp_path / "eval"
    assert main(["--predictions", str(a), str(b), "--out", str(out),
                 "--bertscore-model", str(tiny_bert), "--bertscore-layers", "2"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["scale"] == "0-100" and set(report["systems"]) == {"flythinker", "baseline"}
    assert report["tasks"] == ["abstract", "review"]
    for name, rows in (("flythinker", _rows(0)), ("baseline", _rows(1))):
        entry = report["systems"][name]
        want = compute_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows],
                               bertscore_model=str(tiny_bert), bertscore_layers=2)
        for k in ("rouge1", "rougeL", "bleu", "meteor"):
            assert entry[k] == pytest.approx(want[k])
        assert entry["bertscore"]["f1"] == pytest.approx(want["bertscore"]["f1"])
        assert _close(entry["position"], want["position"])
        assert set(entry["by_task"]) == {"abstract", "review"}
        assert entry["by_task"]["review"]["n"] == 2
        assert entry["generation"]["mean_n_tokens"] == pytest.approx(11.5)
    md = (out / "metrics.md").read_text()
    for needle in ("| flythinker |", "| baseline |", "baseline / review", "[300,end)", "BERTScore-F1"):
        assert needle in md
    assert (out / "position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_sh_runs_the_cli(tmp_path):
    a = _write_jsonl(tmp_path / "sys.jsonl", _rows(0))
    run = subprocess.run(["bash", str(REPO / "launch" / "eval.sh"), "--predictions", str(a), "--out",
                          str(tmp_path / "o"), "--names", "Mine", "--no-meteor"],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(report["systems"]) == ["Mine"]
    assert report["systems"]["Mine"]["bertscore"]["status"] == "unavailable"  # BERTSCORE_MODEL=none
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
