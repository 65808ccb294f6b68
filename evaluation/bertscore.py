"""BERTScore with a local encoder (bert-score's algorithm; see `bertscore_samples`)."""

from __future__ import annotations

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
