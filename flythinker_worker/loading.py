"""Build a FlyThinker from two HF model folders (or a FlyThinker checkpoint), refusing pairs that do not
share a tokenizer."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .model import CONFIG_NAME, FlyThinker, check_checkpoint


def check_same_vocabulary(generator_tokenizer, reasoner_tokenizer) -> None:
    """Both models read the same token ids: their tokenizers must map every token to the same id."""
    gen_vocab, rsn_vocab = generator_tokenizer.get_vocab(), reasoner_tokenizer.get_vocab()
    if gen_vocab != rsn_vocab:
        only_gen = len(set(gen_vocab.items()) - set(rsn_vocab.items()))
        only_rsn = len(set(rsn_vocab.items()) - set(gen_vocab.items()))
        raise ValueError(
            f"vocabulary mismatch: generator tokenizer ({len(gen_vocab)} tokens) and reasoner tokenizer "
            f"({len(rsn_vocab)} tokens) differ in {only_gen}/{only_rsn} (token, id) pairs; FlyThinker feeds "
            "the same ids to both models, so pick a reasoner from the generator's model family")


def load_flythinker(generator_path: str, reasoner_path: str | None, lam: float, positions: str,
                    projection: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    trust_remote_code: bool = False):
    """(FlyThinker, tokenizer). `generator_path` may also be a FlyThinker checkpoint folder, whose stored
    weights (and projection) are loaded while `lam`/`positions`/`projection` come from the arguments."""
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if os.path.exists(os.path.join(generator_path, CONFIG_NAME)):
        check_checkpoint(generator_path, tokenizer=True)
        checkpoint = FlyThinker.from_pretrained(generator_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(generator_path, trust_remote_code=trust_remote_code)
        model = FlyThinker(checkpoint.generator, checkpoint.reasoner if lam else None, lam=lam,
                           positions=positions, projection=projection, vocab_size=len(tokenizer))
        if model.projection is not None and checkpoint.projection is not None:
            model.projection.load_state_dict(checkpoint.projection.state_dict())
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(generator_path, trust_remote_code=trust_remote_code)
    generator = AutoModelForCausalLM.from_pretrained(generator_path, **kwargs)
    reasoner = None
    if lam != 0:
        if not reasoner_path:
            raise ValueError("model.reasoner.path is required when fusion.lam != 0")
        check_same_vocabulary(tokenizer, AutoTokenizer.from_pretrained(reasoner_path,
                                                                       trust_remote_code=trust_remote_code))
        reasoner = AutoModelForCausalLM.from_pretrained(reasoner_path, **kwargs)
    model = FlyThinker(generator, reasoner, lam=lam, positions=positions, projection=projection,
                       vocab_size=len(tokenizer))
    return model, tokenizer
