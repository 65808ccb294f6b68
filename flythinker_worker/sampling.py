"""Next-token sampling shared by both decoders. `sample_next` draws with torch.Generators (the reference
decoder); `sample_tokens` draws with counter-based noise hashed from (row seed, sample index, vocab id),
so a row's k-th token never depends on its batch, slot or device. Plain torch (and numpy's sort on CPU).

Seed contract (`sample_tokens`). Row seed S (an int >= 0, e.g. recipe.rollout.row_seed), sample index k
(0 for the first generated token). The noise for vocabulary entry v is u(S, k, v) in (0, 1): a 32-bit
integer hash (xorshift-multiply rounds) of (S, k, v), its top 24 bits as a float. The k-th token is
argmax_v(logits_v / T + g_v) over the entries that survive top-k/top-p, with Gumbel noise
g_v = -log(-log(u)): an exact draw from softmax(logits / T) restricted to the nucleus, as `sample_next`
draws. So the k-th token of a row depends only on S, k and the row's logits, i.e. on (S, its prompt,
its earlier tokens): never on the batch, the slot, the worker count or the device's RNG state.
Greedy (T = 0) is argmax and uses no noise.
"""

from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # 2^32 - floor(2^32 / phi); every multiplier below is odd and < 2^31, so products of
_MUL = (0x7FEB352D, 0x1B873593, 0x5BD1E995)  # 32-bit values never overflow int64 (no wrap-around UB)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy when temperature == 0, else temperature, then top-k,
    then top-p (nucleus: the smallest set of most likely tokens whose mass reaches top_p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_scores(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens, temperature, top_p, top_k) -> None:
    """ValueError for a sampling setting no decoder accepts."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values in [0, 2^32)."""
    for mul in _MUL:
        x = x ^ (x >> 16)
        x = (x * mul) & _M32
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit keys from int64 seeds (all 64 bits count). (B,) int64."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return _mix32(_mix32(lo ^ 0x2545F491) ^ hi)


def vocab_keys(vocab: int, device=None) -> torch.Tensor:
    """The per-entry half of the noise hash, (V,) int64: fixed for a vocabulary, so a decoder computes it
    once instead of every step."""
    v = torch.arange(vocab, device=device, dtype=torch.int64)
    return _mix32((v * _GOLDEN + 0x27D4EB2F) & _M32)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int,
                  keys: torch.Tensor | None = None) -> torch.Tensor:
    """u(S_b, k_b, v) in (0, 1) for every row b and vocabulary entry v: (B, V) float32, 24 random bits.
    A pure function of (seed, counter, v): the same on every device and in every batch. `keys`: a cached
    `vocab_keys(vocab)`."""
    step_key = _mix32(row_keys(seeds) ^ _mix32((counters & _M32) * _GOLDEN & _M32))  # (B,)
    keys = vocab_keys(vocab, seeds.device) if keys is None else keys
    h = _mix32(step_key[:, None] ^ keys[None, :])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def _sorted_descending(scores: torch.Tensor) -> torch.Tensor:
    """The values of scores (..., V) in descending order. On CPU through numpy's vectorised sort: the
    nucleus needs values only, and torch.sort (which also builds indices) took ~4x longer for 8 x 2048
    here, ~4% of a CPU decode step (bench/decode.py)."""
    if scores.device.type == "cpu":
        ascending = np.sort(scores.detach().numpy(), axis=-1)
        return torch.from_numpy(np.ascontiguousarray(ascending[..., ::-1]))
    return torch.sort(scores, dim=-1, descending=True).values


def filter_scores(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits / T with entries outside top-k, then outside the top-p nucleus, set to -inf (nucleus: the
    smallest set of most likely tokens whose mass reaches top_p, with every token tied with its least likely
    member); both samplers draw from its softmax."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ranked = _sorted_descending(scores)
        probs = ranked.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token has 0 before it: always kept
        kept = (mass_before < top_p).sum(dim=-1, keepdim=True)  # (B, 1), >= 1
        scores = scores.masked_fill(scores < ranked.gather(-1, kept - 1), float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) under the module's seed contract; greedy when temperature == 0.
    No host synchronisation, no Python loop over rows. `keys`: a cached `vocab_keys(V)`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = filter_scores(logits, temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, counters, scores.shape[-1], keys)))
    return (scores + gumbel).argmax(dim=-1)


def row_seed_tensor(seed, batch: int, device) -> torch.Tensor:
    """(batch,) long row seeds: a list gives row i seed[i]; one int gives row i `seed + i`; None, i."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed has {len(seed)} entries for {batch} rows")
        return torch.tensor([int(x) for x in seed], dtype=torch.long, device=device)
    base = 0 if seed is None else int(seed)
    return torch.arange(batch, dtype=torch.long, device=device) + base
