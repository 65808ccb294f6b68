"""The static buffers of one fast-decoding configuration (slots, cache length, sampling), reused across
calls because captured CUDA graphs keep pointers to them. Plain torch + transformers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import vocab_keys
from .static_lm import StaticLM


@dataclass(frozen=True)
class SessionKey:
    slots: int
    max_len: int
    temperature: float
    top_k: int
    top_p: float
    eos: tuple
    pad: int
    max_new: int  # the output buffers' width (a call's own limit is Session.limit)
    output_logits: bool
    lam: float  # baked into a captured graph: a changed model.lam needs a new session


class Session:
    """Static buffers for one (slots, max_len, sampling) configuration, reused across calls (CUDA graphs
    keep pointers to them)."""

    def __init__(self, decoder, key: SessionKey, device, dtype):
        self.key = key
        model = decoder.model
        n = key.slots
        self.generator = StaticLM(model.generator, n, key.max_len, decoder.attention)
        self.reasoner = StaticLM(model.reasoner, n, key.max_len, decoder.attention) \
            if decoder.reasoner_steps else None
        d_g = model.generator.get_input_embeddings().weight.shape[1]
        long = dict(device=device, dtype=torch.long)
        self.rows = torch.arange(n, **long)
        self.tokens = torch.zeros(n, **long)  # the token each slot feeds next
        self.pos = torch.zeros(n, **long)  # its position = cache index
        self.seeds = torch.zeros(n, **long)
        self.counter = torch.zeros(n, **long)  # tokens sampled so far (= the next sample's index k)
        self.finished = torch.ones(n, device=device, dtype=torch.bool)  # idle slots count as finished
        self.latent = torch.zeros(n, 1, d_g, device=device, dtype=dtype)  # fit(r_{t-1})
        self.limit = torch.tensor(key.max_new, **long)  # this call's max_new_tokens (<= key.max_new)
        self.out = torch.full((n, key.max_new + 1), key.pad, **long)  # column max_new: a bin for done rows
        self.eos = torch.tensor(key.eos or [-1], **long)
        self.logits = torch.zeros(n, key.max_new + 1, model.generator.config.vocab_size, device=device,
                                  dtype=torch.float32) if key.output_logits else None
        # The noise hash's fixed half, one entry per logit.
        self.vocab_keys = vocab_keys(model.generator.get_output_embeddings().weight.shape[0], device)
        self.graph = None
        self.step_fn = None

    def reset(self):
        self.finished.fill_(True)
        self.pos.zero_()
        self.counter.zero_()
        self.out.fill_(self.key.pad)
        if self.logits is not None:
            self.logits.zero_()


def snapshot(s: Session) -> dict:
    """Copies of the state a step advances (to undo steps, e.g. the warm-up and capture of a CUDA graph).
    The KV caches are not copied: a step writes slot b's K/V at index pos[b] and then reads indices
    <= pos[b] only, so whatever undone steps wrote at indices >= the restored pos is overwritten before
    it is read. (Copying them would double the caches' memory at capture time.)"""
    names = ("tokens", "pos", "seeds", "counter", "finished", "latent", "out", "logits")
    return {n: getattr(s, n).clone() for n in names if getattr(s, n) is not None}


def restore(s: Session, snap: dict) -> None:
    """Write a `snapshot` back into the session's buffers in place (graph pointers stay valid)."""
    for name, value in snap.items():
        getattr(s, name).copy_(value)
