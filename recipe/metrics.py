"""Evaluation metrics for personalised long-form generation, with LongLaMP's conventions.

    python -m recipe.metrics --predictions A.jsonl [B.jsonl ...] --out DIR \
        [--names A B] [--tokenizer PATH] [--bertscore-model PATH_OR_NONE]

writes DIR/metrics.json, DIR/metrics.md (the paper's Table 1 / Figure 4 layout: one row per system)
and DIR/position.png. All scores are on one 0-100 scale (`SCALE`):
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

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("recipe.metrics")

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


class InputError(ValueError):
    """A predictions file that cannot be scored; the message names the file and line."""


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
    """None -> the project's tiny tokenizer; a str/Path -> AutoTokenizer.from_pretrained; else as is."""
    if tokenizer is None:
        from flythinker_worker.tiny import load_tiny_tokenizer
        return load_tiny_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(tokenizer))
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


def _mean(values) -> float | None:
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
BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "roberta-large-mnli": 19,
                    "bert-base-uncased": 9, "bert-large-uncased": 18, "distilroberta-base": 5,
                    "distilbert-base-uncased": 5, "bert-base-multilingual-cased": 9,
                    "xlm-roberta-large": 17, "microsoft/deberta-xlarge-mnli": 40,
                    "deberta-xlarge-mnli": 40, "microsoft/deberta-large-mnli": 18, "deberta-large-mnli": 18}


def _bertscore_pair(h, r, hw, rw) -> tuple[float, float, float]:
    """Greedy cosine matching of unit-norm token embeddings h [n,d], r [m,d] with weights hw, rw."""
    if hw.sum() == 0 or rw.sum() == 0:  # empty text (only special tokens): 0, as bert-score does
        return 0.0, 0.0, 0.0
    sim = h @ r.T
    p = float((sim.max(dim=1).values * hw).sum() / hw.sum())
    rec = float((sim.max(dim=0).values * rw).sum() / rw.sum())
    return p, rec, (2 * p * rec / (p + rec) if p + rec else 0.0)


def bertscore_samples(predictions: Sequence[str], references: Sequence[str], model: str | None, *,
                      num_layers: int | None = None, batch_size: int = 16, device: str | None = None,
                      progress: bool = False) -> dict:
    """Per-sample BERTScore P/R/F1 (0-100) with a local model folder (or cached name), or why not.

    bert-score 0.3.13's algorithm, idf off: encode the stripped text with special tokens (byte-level BPE
    tokenizers of RoBERTa/GPT-2 with a prefix space), embeddings = hidden_states[num_layers], cosine
    similarity of every candidate token to every reference token, greedy max per token; every token
    weighs 1 except CLS/SEP (0); empty texts score 0. Re-implemented because the bert-score package
    crashes on empty texts and drops RoBERTa's prefix space with transformers 5. `num_layers` defaults
    to bert-score's tuned layer for the model's (base)name (roberta-large -> 17), else the last layer.
    Returns {"status": "ok", "model", "num_layers", "precision": [...], "recall": [...], "f1": [...]}
    or {"status": "unavailable", "reason": ...}."""
    if model is None or str(model).lower() == "none":
        return {"status": "unavailable",
                "reason": "no BERTScore model given (--bertscore-model PATH); the usual roberta-large "
                          "cannot be downloaded on these machines"}
    import torch
    from transformers import AutoModel, AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model))
        enc = AutoModel.from_pretrained(str(model))
    except Exception as err:  # noqa: BLE001 - any load failure is reported, never replaced by a number
        reason = f"BERTScore model {model!r} could not be loaded: {type(err).__name__}: {err}"
        log.warning(reason)
        return {"status": "unavailable", "reason": reason}
    name = str(model).rstrip("/")
    n_layers = enc.config.num_hidden_layers
    if num_layers is None:
        num_layers = BERTSCORE_LAYERS.get(name) or BERTSCORE_LAYERS.get(Path(name).name) or n_layers
    if not 0 <= num_layers <= n_layers:
        raise ValueError(f"BERTScore layer {num_layers} outside 0..{n_layers} for {model}")
    max_pos = getattr(enc.config, "max_position_embeddings", None)
    if max_pos is not None and tok.model_max_length > max_pos:
        # Truncation is at model_max_length; past the position table the model would index out of range.
        raise ValueError(f"BERTScore tokenizer model_max_length {tok.model_max_length} exceeds the model's "
                         f"max_position_embeddings {max_pos}: set model_max_length in tokenizer_config.json")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    enc.to(device).eval()
    prefix = " " if isinstance(tok, (GPT2Tokenizer, RobertaTokenizer)) else ""
    zero_weight = {tok.cls_token_id, tok.sep_token_id} - {None}
    log.info("BERTScore with %s, layer %d of %d, on %d samples (%s)", model, num_layers, n_layers,
             len(predictions), device)

    # Unique non-empty texts, similar lengths sharing a batch; an empty text scores 0 without a forward.
    texts = sorted({t for t in (*predictions, *references) if t.strip()}, key=len)
    embedded = {}
    for i in tqdm(range(0, len(texts), batch_size), desc="BERTScore", disable=not progress, unit="batch"):
        chunk = texts[i:i + batch_size]
        ids = [tok(prefix + t.strip(), add_special_tokens=True, truncation=True,
                   max_length=tok.model_max_length)["input_ids"] for t in chunk]
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            hidden = enc(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        emb = torch.nn.functional.normalize(hidden[num_layers].float(), dim=-1).cpu()
        for t, x, e in zip(chunk, ids, emb):
            embedded[t] = (e[:len(x)], torch.tensor([0.0 if tid in zero_weight else 1.0 for tid in x]))

    def score(pred: str, ref: str) -> tuple[float, float, float]:
        if pred not in embedded or ref not in embedded:
            return 0.0, 0.0, 0.0
        (h, hw), (r, rw) = embedded[pred], embedded[ref]
        return _bertscore_pair(h, r, hw, rw)

    scores = [score(p, r) for p, r in zip(predictions, references)]
    return {"status": "ok", "model": str(model), "num_layers": int(num_layers),
            "precision": [100 * s[0] for s in scores], "recall": [100 * s[1] for s in scores],
            "f1": [100 * s[2] for s in scores]}


def aggregate(records: Sequence[dict], bertscore: dict | None = None, indices: Sequence[int] | None = None,
              bounds: Sequence[int] = DEFAULT_BOUNDS) -> dict:
    """Corpus-level metrics over `records` (all, or those at `indices`): averages and corpus BLEU."""
    idx = list(range(len(records))) if indices is None else list(indices)
    recs = [records[i] for i in idx]
    has_meteor = bool(recs) and "meteor" in recs[0]
    out: dict = {"n": len(recs), "n_empty_predictions": sum(not r["prediction"].strip() for r in recs)}
    for m in ("rouge1", "rougeL"):
        out[m] = _mean(r[m] for r in recs)
    out["bleu"] = _bleu([r["prediction"] for r in recs], [r["reference"] for r in recs])
    out["meteor"] = (_mean(r["meteor"] for r in recs) if has_meteor
                     else {"status": "skipped", "reason": "METEOR not computed (--no-meteor)"})
    if bertscore is None or bertscore["status"] != "ok":
        out["bertscore"] = bertscore or {"status": "skipped", "reason": "not requested"}
    else:
        out["bertscore"] = {"status": "ok", "model": bertscore["model"], "num_layers": bertscore["num_layers"],
                            **{k: _mean(bertscore[k][i] for i in idx) for k in ("precision", "recall", "f1")}}
    if recs and "segments" in recs[0]:
        segments = []
        for k, name in enumerate(segment_names(bounds)):
            scored = [(r["segments"][k], r["reference"]) for r in recs if r["segments"][k] is not None]
            seg = {"segment": name, "n_scored": len(scored), "n_empty": len(recs) - len(scored)}
            for m in ("rouge1", "rougeL") + (("meteor",) if has_meteor else ()):
                seg[m] = _mean(s[m] for s, _ in scored)
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
    bs = bertscore_samples(predictions, references, bertscore_model, num_layers=bertscore_layers,
                           progress=progress)
    return {"scale": SCALE, **aggregate(records, bs, bounds=bounds)}


def load_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL (`id`, `prediction`, `reference`, optional `task`, `n_tokens`, ...)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("id", "prediction", "reference"):
                if key not in row:
                    raise InputError(f"{path}:{lineno}: row has no {key!r} field")
            for key in ("prediction", "reference"):
                if not isinstance(row[key], str):
                    raise InputError(f"{path}:{lineno}: {key!r} must be a string, got {type(row[key]).__name__}")
            if not row["reference"].strip():
                raise InputError(f"{path}:{lineno}: empty reference")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no prediction rows (empty file)")
    return rows


def evaluate_rows(rows: list[dict], tokenizer, *, bounds=DEFAULT_BOUNDS, meteor=True, bertscore_model=None,
                  bertscore_layers=None, name: str = "") -> dict:
    """One system's entry: overall metrics, generation stats, and `by_task` when rows span several tasks."""
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    log.info("%s: ROUGE-1/ROUGE-L%s per sample and per position segment over %d samples",
             name, "/METEOR" if meteor else "", len(rows))
    records = score_samples(preds, refs, tokenizer, bounds=bounds, meteor=meteor, progress=True,
                            desc=f"scoring {name}")
    bs = bertscore_samples(preds, refs, bertscore_model, num_layers=bertscore_layers, progress=True)
    log.info("%s: corpus BLEU and averages", name)
    entry = aggregate(records, bs, bounds=bounds)
    for key in ("n_tokens", "seconds"):
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            entry.setdefault("generation", {})[f"mean_{key}"] = _mean(vals)
    tasks = sorted({str(r.get("task", "unknown")) for r in rows})
    if len(tasks) > 1:
        entry["by_task"] = {t: aggregate(records, bs, [i for i, r in enumerate(rows)
                                                       if str(r.get("task", "unknown")) == t], bounds)
                            for t in tasks}
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: score prediction files side by side and write metrics.json, metrics.md and position.png."""
    ap = argparse.ArgumentParser(prog="python -m recipe.metrics", description=__doc__.split("\n")[0])
    ap.add_argument("--predictions", nargs="+", required=True, help="prediction JSONL file(s)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--names", nargs="+", help="system names (default: file stems)")
    ap.add_argument("--tokenizer", help="generator tokenizer folder for position segments "
                                        "(default: the project's tiny tokenizer)")
    ap.add_argument("--bounds", nargs="+", type=int, default=list(DEFAULT_BOUNDS),
                    help="token positions where segments start (default: 100 200 300)")
    ap.add_argument("--bertscore-model", default="none", help="local BERTScore model folder, or none")
    ap.add_argument("--bertscore-layers", type=int, help="layer to take embeddings from")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (no WordNet needed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        names = args.names or [Path(p).stem for p in args.predictions]
        if len(names) != len(args.predictions):
            raise InputError(f"{len(names)} --names for {len(args.predictions)} prediction files")
        if len(set(names)) != len(names):
            raise InputError(f"system names must be unique, got {names}: pass --names")
        systems_rows = {n: load_predictions(p) for n, p in zip(names, args.predictions)}
        if len({frozenset(str(r["id"]) for r in rows) for rows in systems_rows.values()}) > 1:
            log.warning("the prediction files do not cover the same ids: rows are not directly comparable")
        if not args.no_meteor:
            require_nltk_data()
        tokenizer = load_tokenizer(args.tokenizer)
        systems = {}
        for (name, rows), path in zip(systems_rows.items(), args.predictions):
            systems[name] = {"file": str(path), **evaluate_rows(
                rows, tokenizer, bounds=tuple(args.bounds), meteor=not args.no_meteor,
                bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers, name=name)}
    except (InputError, MissingNltkData, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"scale": SCALE, "conventions": CONVENTIONS, "bounds": [0, *args.bounds],
              "segments": segment_names(args.bounds),
              "tokenizer": args.tokenizer or "flythinker_worker.tiny (tiny tokenizer)",
              "tasks": sorted({str(r.get("task", "unknown")) for rows in systems_rows.values() for r in rows}),
              "systems": systems}
    from recipe.plots import plot_position, write_markdown

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "metrics.md")
    plot_position(report, out / "position.png")
    log.info("wrote %s, %s, %s", out / "metrics.json", out / "metrics.md", out / "position.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
