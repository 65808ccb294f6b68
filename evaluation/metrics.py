"""Evaluation metrics for personalised long-form generation, with LongLaMP's conventions.

Scoring only; `python -m evaluation.report` (launch/eval.sh) turns prediction files into metrics.json,
metrics.md and position.png. All scores are on one 0-100 scale (`SCALE`):
  - rouge1 / rougeL: rouge-score F-measure, no stemmer, per sample then averaged (no bootstrap), x100;
  - bleu: sacrebleu corpus BLEU, tokenize 13a, one reference per sample (natively 0-100);
  - meteor: NLTK single_meteor_score(alpha=0.9, beta=3, gamma=0.5) over nltk.word_tokenize, per sample
    then averaged, x100. Needs WordNet and punkt_tab: `bash scripts/install_wordnet.sh`;
  - bertscore: BERTScore P/R/F1 (bert-score's algorithm, idf off, no baseline rescaling) with a local
    model, x100; without one it is {"status": "unavailable", "reason": ...}, never a number;
  - position: the prediction is cut by generator-token position (tokenize with add_special_tokens=False,
    slice the ids at `bounds`, decode each slice) into [0,100), [100,200), [200,300), [300,end); each
    segment is scored against the whole reference (rouge1/rougeL/bleu/meteor). A segment with no tokens
    (the prediction ended before it) is counted in `n_empty` and left out of that segment's averages,
    not scored as 0. A slice boundary may split a multi-byte character (decoded as U+FFFD).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from flythinker_worker import utils

log = logging.getLogger(__name__)

SCALE = "0-100"
METRICS = ("rouge1", "rougeL", "bleu", "meteor")
DEFAULT_BOUNDS = (100, 200, 300)
METEOR_PARAMS = dict(alpha=0.9, beta=3, gamma=0.5)
INSTALL_HINT = ("run `bash scripts/install_wordnet.sh` (installs WordNet and punkt_tab into "
                "$NLTK_DATA, default ~/nltk_data)")
CONVENTIONS = {
    "scale": "all scores 0-100: ROUGE/METEOR/BERTScore values x100, BLEU is sacrebleu's native scale",
    "rouge": "rouge-score RougeScorer(['rouge1','rougeL'], use_stemmer=False), per-sample F averaged",
    "bleu": "sacrebleu corpus_bleu, tokenize=13a, one reference per sample",
    "meteor": "nltk single_meteor_score(alpha=0.9, beta=3, gamma=0.5) over nltk.word_tokenize, averaged",
    "bertscore": "bert-score 0.3.13 greedy matching re-implemented, idf off, no baseline rescaling; "
                 "mean of per-sample P/R/F1",
    "position": "prediction token ids (add_special_tokens=False) sliced at bounds and decoded; each "
                "segment scored against the full reference; empty segments counted, not scored",
}


class MissingNltkData(RuntimeError):
    """WordNet or punkt_tab is not installed where NLTK looks."""


def require_nltk_data() -> None:
    """Raise MissingNltkData (with the install command) unless METEOR's NLTK data loads."""
    import nltk
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("dog")  # the lazy loader reads the corpus on first use
        nltk.word_tokenize("Data check. Second sentence.")
    except LookupError as err:
        first = next((line.strip() for line in str(err).splitlines() if "Resource" in line), str(err))
        raise MissingNltkData(f"METEOR needs NLTK's WordNet and punkt_tab ({first}): {INSTALL_HINT}; "
                              f"NLTK searched {list(nltk.data.path)}") from None


def nltk_data_present() -> bool:
    """Whether METEOR can run (for callers that prefer skipping METEOR to failing, e.g. the trainer)."""
    try:
        require_nltk_data()
    except MissingNltkData:
        return False
    return True


def load_tokenizer(tokenizer=None):
    """None -> the project's tiny tokenizer; a str/Path -> that folder's tokenizer; else as is."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        return utils.load_tokenizer(tokenizer)
    return tokenizer


def segment_names(bounds: Sequence[int] = DEFAULT_BOUNDS) -> list[str]:
    """["[0,100)", "[100,200)", "[200,300)", "[300,end)"] for the default bounds."""
    starts = (0, *bounds)
    return [f"[{a},{b})" for a, b in zip(starts, bounds)] + [f"[{bounds[-1]},end)"]


def position_segments(prediction: str, tokenizer, bounds: Sequence[int] = DEFAULT_BOUNDS) -> list[str]:
    """Cut `prediction` by generator-token position: len(bounds)+1 decoded slices ("" where no tokens)."""
    if not bounds or any(b <= a for a, b in zip((0, *bounds), bounds)):
        raise ValueError(f"bounds must be positive and strictly increasing, got {tuple(bounds)}")
    ids = tokenizer(prediction, add_special_tokens=False)["input_ids"]
    starts, ends = (0, *bounds), (*bounds, None)
    # clean_up_tokenization_spaces=False: the slices must concatenate back to the decoded prediction.
    return [tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False) if ids[a:b] else ""
            for a, b in zip(starts, ends)]


def mean_or_none(values) -> float | None:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def _bleu(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    import sacrebleu
    if not predictions:
        return None
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="13a").score)


def score_samples(predictions: Sequence[str], references: Sequence[str], tokenizer=None, *,
                  bounds: Sequence[int] = DEFAULT_BOUNDS, position: bool = True, meteor: bool = True,
                  progress: bool = False, desc: str = "scoring") -> list[dict]:
    """Per-sample ROUGE/METEOR (0-100) for each prediction and, with `position`, for each segment.

    BLEU is a corpus statistic, so `aggregate` computes it from the texts kept in each record."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    from rouge_score import rouge_scorer
    if meteor:
        require_nltk_data()
        import nltk
        from nltk.translate.meteor_score import single_meteor_score
    tokenizer = load_tokenizer(tokenizer) if position else None
    rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)

    def scores(pred: str, ref: str, ref_words: list[str] | None) -> dict:
        r = rouge.score(ref, pred)  # (target, prediction); F is symmetric anyway
        out = {"rouge1": 100 * r["rouge1"].fmeasure, "rougeL": 100 * r["rougeL"].fmeasure}
        if meteor:
            out["meteor"] = 100 * single_meteor_score(ref_words, nltk.word_tokenize(pred), **METEOR_PARAMS)
        return out

    records = []
    for pred, ref in tqdm(list(zip(predictions, references)), desc=desc, disable=not progress,
                          unit="sample"):
        ref_words = nltk.word_tokenize(ref) if meteor else None  # once per reference, reused by segments
        rec = {"prediction": pred, "reference": ref, **scores(pred, ref, ref_words)}
        if position:
            rec["segments"] = [None if not seg else {"text": seg, **scores(seg, ref, ref_words)}
                               for seg in position_segments(pred, tokenizer, bounds)]
        records.append(rec)
    return records


# bert-score's tuned layers (its model2layers table) for the usual models, keyed by (base)name.
def aggregate(records: Sequence[dict], bertscore: dict | None = None, indices: Sequence[int] | None = None,
              bounds: Sequence[int] = DEFAULT_BOUNDS) -> dict:
    """Corpus-level metrics over `records` (all, or those at `indices`): averages and corpus BLEU."""
    idx = list(range(len(records))) if indices is None else list(indices)
    recs = [records[i] for i in idx]
    has_meteor = bool(recs) and "meteor" in recs[0]
    out: dict = {"n": len(recs), "n_empty_predictions": sum(not r["prediction"].strip() for r in recs)}
    for m in ("rouge1", "rougeL"):
        out[m] = mean_or_none(r[m] for r in recs)
    out["bleu"] = _bleu([r["prediction"] for r in recs], [r["reference"] for r in recs])
    out["meteor"] = (mean_or_none(r["meteor"] for r in recs) if has_meteor
                     else {"status": "skipped", "reason": "METEOR not computed (--no-meteor)"})
    if bertscore is None or bertscore["status"] != "ok":
        out["bertscore"] = bertscore or {"status": "skipped", "reason": "not requested"}
    else:
        out["bertscore"] = {"status": "ok", "model": bertscore["model"], "num_layers": bertscore["num_layers"],
                            **{k: mean_or_none(bertscore[k][i] for i in idx) for k in ("precision", "recall", "f1")}}
    if recs and "segments" in recs[0]:
        segments = []
        for k, name in enumerate(segment_names(bounds)):
            scored = [(r["segments"][k], r["reference"]) for r in recs if r["segments"][k] is not None]
            seg = {"segment": name, "n_scored": len(scored), "n_empty": len(recs) - len(scored)}
            for m in ("rouge1", "rougeL") + (("meteor",) if has_meteor else ()):
                seg[m] = mean_or_none(s[m] for s, _ in scored)
            seg["bleu"] = _bleu([s["text"] for s, _ in scored], [ref for _, ref in scored])
            segments.append(seg)
        out["position"] = {"bounds": [0, *bounds], "segments": segments}
    return out


def compute_metrics(predictions: list[str], references: list[str], tokenizer=None, *,
                    bounds: Sequence[int] = DEFAULT_BOUNDS, position: bool = True, meteor: bool = True,
                    bertscore_model: str | None = None, bertscore_layers: int | None = None,
                    progress: bool = False) -> dict:
    """All metrics (0-100, see module doc) for parallel lists; `tokenizer` (the generator's, default the
    tiny one) only cuts the position segments. Raises MissingNltkData when METEOR's data is missing."""
    records = score_samples(predictions, references, tokenizer, bounds=bounds, position=position,
                            meteor=meteor, progress=progress)
    from .bertscore import bertscore_samples

    bs = bertscore_samples(predictions, references, bertscore_model, num_layers=bertscore_layers,
                           progress=progress)
    return {"scale": SCALE, **aggregate(records, bs, bounds=bounds)}
