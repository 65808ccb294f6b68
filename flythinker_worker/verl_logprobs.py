"""Per-token log-probabilities for verl's losses, from FlyThinker's packed (tokens, vocab) logits."""

from __future__ import annotations

import torch
from verl.utils import torch_functional as verl_F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True,
                   chunk: int = 4096) -> torch.Tensor:
    """log p(labels) (T,) from logits (T, V) through verl's `logprobs_from_logits`, in (1, chunk, V) pieces.

    Why pieces of one row: with flash-attn verl uses its cross-entropy kernel (any shape); without it, the
    fallback loops in Python over the leading dimension, i.e. per token for 2-D input (thousands of small
    kernels per micro-batch, forward and backward). `inplace_backward` as verl's: off when the logits are
    also needed for the entropy."""
    return torch.cat([verl_F.logprobs_from_logits(logits[i:i + chunk][None], labels[i:i + chunk][None],
                                                  inplace_backward=inplace_backward)[0]
                      for i in range(0, logits.shape[0], chunk)])
