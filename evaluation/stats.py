"""Bootstrap confidence intervals and paired bootstrap tests over rows (numpy only, no imports of ours).

Every statistic here is a ratio of row sums, so a resample is a vector of row multiplicities `w` (how often
each row was drawn) and its statistic is computed from `w @ values`: one matrix product for all resamples
instead of a Python loop. The draws come from `resample_indices(n, n_resamples, seed)`, so a slow loop over
the same index rows reproduces every resampled value (tests/test_stats.py does exactly that).

- `mean_ci`: percentile CI of a mean over rows (rows marked missing are left out of every resample's mean,
  as they are left out of the point estimate).
- `corpus_bleu_ci`: resample rows, recompute sacrebleu's corpus BLEU from the summed per-row sufficient
  statistics (`bleu_from_stats` reproduces sacrebleu 2.x `BLEU.compute_bleu` with its default `exp`
  smoothing, vectorised).
- `paired_*`: the two systems' rows are resampled TOGETHER (same draws), the reported delta is
  reference minus other, and the p-value is the two-sided paired bootstrap test of "no difference":
  the bootstrap deltas shifted to mean 0 approximate the null distribution, and
  p = (1 + #{|delta_b - mean(delta)| >= |delta_observed|}) / (n_resamples + 1)
  (as sacrebleu's paired bootstrap; Koehn 2004, Berg-Kirkpatrick et al. 2012). Identical systems give
  p = 1; a system better on every row by a margin large against the resampling spread gives
  p = 1 / (n_resamples + 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
MAX_NGRAM_ORDER = 4
_LOG_ZERO = -9999999999.0  # sacrebleu.utils.my_log(0): a floored log, not -inf


def _check(n_resamples: int, level: float) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def resample_indices(n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(n_resamples, n) row indices drawn with replacement; the same (n, n_resamples, seed) gives the same."""
    _check(n_resamples, LEVEL)
    if n < 1:
        raise ValueError(f"cannot bootstrap {n} rows")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def resample_weights(n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(n_resamples, n) float multiplicities: weights[b, i] = how often row i is in resample b (read-only:
    cached, since every metric and segment of a table reuses the same draws)."""
    return _weights(int(n), int(n_resamples), int(seed))


@functools.lru_cache(maxsize=8)
def _weights(n: int, n_resamples: int, seed: int) -> np.ndarray:
    idx = resample_indices(n, n_resamples, seed)
    flat = idx + (np.arange(n_resamples)[:, None] * n)  # a separate bin range per resample: one bincount
    w = np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)
    w.flags.writeable = False
    return w


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The (lo, hi) percentile interval of bootstrap `samples`, ignoring NaN (resamples with no rows);
    None when every sample is NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0 or np.isnan(samples).all():
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def _values_and_mask(values: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """None/NaN entries are missing rows (mask 0), so they count neither in sums nor in row counts."""
    arr = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    mask = ~np.isnan(arr)
    return np.where(mask, arr, 0.0), mask.astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_means(values: Sequence[float | None], weights: np.ndarray) -> np.ndarray:
    """Each resample's mean of the non-missing values: (n_resamples,), NaN where a resample has none."""
    vals, mask = _values_and_mask(values)
    return _ratio(weights @ vals, weights @ mask)


def mean_ci(values: Sequence[float | None], n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
            level: float = LEVEL, weights: np.ndarray | None = None) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean over rows (None entries are missing rows); None when no rows."""
    _check(n_resamples, level)
    if not len(values) or all(v is None for v in values):
        return None
    w = resample_weights(len(values), n_resamples, seed) if weights is None else weights
    return percentile_ci(bootstrap_means(values, w), level)


def bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100) for each row of summed sacrebleu statistics (..., 2 + 2 * 4):
    [sys_len, ref_len, correct_1..4, total_1..4]; sacrebleu's compute_bleu, smooth_method='exp'."""
    stats = np.asarray(stats, dtype=np.float64)
    k = MAX_NGRAM_ORDER
    sys_len, ref_len = stats[..., 0], stats[..., 1]
    correct, total = stats[..., 2:2 + k], stats[..., 2 + k:2 + 2 * k]
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / np.maximum(sys_len, 1)), 0.0),
                      1.0)
        precisions = np.zeros_like(correct)
        smooth = np.ones_like(sys_len)
        active = np.ones_like(sys_len, dtype=bool)  # sacrebleu stops at the first order with no n-grams
        for n in range(k):
            active &= total[..., n] > 0
            zero = active & (correct[..., n] == 0)
            smooth = np.where(zero, smooth * 2, smooth)
            safe_total = np.where(total[..., n] > 0, total[..., n], 1.0)
            p = np.where(zero, 100.0 / (smooth * safe_total), 100.0 * correct[..., n] / safe_total)
            precisions[..., n] = np.where(active, p, 0.0)
        logs = np.where(precisions == 0, _LOG_ZERO, np.log(np.where(precisions == 0, 1.0, precisions)))
        score = bp * np.exp(logs.sum(axis=-1) / k)
    return np.where(correct.sum(axis=-1) == 0, 0.0, score)  # sacrebleu's early exit: no match at all -> 0


def bootstrap_bleu(stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each resample's corpus BLEU from per-row statistics (n, 10): (n_resamples,)."""
    return bleu_from_stats(weights @ np.asarray(stats, dtype=np.float64))


def corpus_bleu_ci(stats: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   level: float = LEVEL, weights: np.ndarray | None = None) -> tuple[float, float] | None:
    """Percentile CI of corpus BLEU, resampling rows of per-row sacrebleu statistics (n, 10)."""
    _check(n_resamples, level)
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 2 or stats.shape[1] != 2 + 2 * MAX_NGRAM_ORDER:
        raise ValueError(f"BLEU statistics must be (rows, {2 + 2 * MAX_NGRAM_ORDER}), got {stats.shape}")
    if not len(stats):
        return None
    w = resample_weights(len(stats), n_resamples, seed) if weights is None else weights
    return percentile_ci(bootstrap_bleu(stats, w), level)


def paired_p_value(observed: float, deltas: np.ndarray) -> float:
    """Two-sided paired bootstrap p-value of `observed` (reference - other) given bootstrap `deltas`."""
    deltas = np.asarray(deltas, dtype=np.float64)
    deltas = deltas[~np.isnan(deltas)]
    if not len(deltas):
        return math.nan
    # A tolerance so that float noise in "identical" systems (delta exactly 0) still counts as >=.
    tol = 1e-9 * max(1.0, abs(observed))
    extreme = np.abs(deltas - deltas.mean()) >= abs(observed) - tol
    return float((1 + extreme.sum()) / (len(deltas) + 1))


def _paired_result(observed: float, deltas: np.ndarray, level: float) -> dict:
    return {"delta": float(observed), "ci": percentile_ci(deltas, level),
            "p_value": paired_p_value(observed, deltas)}


def paired_mean_test(reference: Sequence[float], other: Sequence[float], n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, level: float = LEVEL, weights: np.ndarray | None = None) -> dict:
    """{"delta": mean(reference) - mean(other), "ci": (lo, hi), "p_value"} over paired rows (same order)."""
    _check(n_resamples, level)
    ref, oth = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape or ref.ndim != 1 or not len(ref):
        raise ValueError(f"paired rows must be two equal, non-empty 1-D lists, got {ref.shape} and {oth.shape}")
    if np.isnan(ref).any() or np.isnan(oth).any():
        raise ValueError("paired rows must not contain missing values")
    diff = ref - oth
    w = resample_weights(len(diff), n_resamples, seed) if weights is None else weights
    return _paired_result(float(diff.mean()), (w @ diff) / len(diff), level)


def paired_bleu_test(reference_stats: np.ndarray, other_stats: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, level: float = LEVEL, weights: np.ndarray | None = None) -> dict:
    """Paired bootstrap of corpus BLEU(reference) - BLEU(other) from per-row statistics of the same rows."""
    _check(n_resamples, level)
    ref, oth = np.asarray(reference_stats, dtype=np.float64), np.asarray(other_stats, dtype=np.float64)
    if ref.shape != oth.shape or not len(ref):
        raise ValueError(f"paired BLEU statistics must have the same non-empty shape, got {ref.shape}, {oth.shape}")
    w = resample_weights(len(ref), n_resamples, seed) if weights is None else weights
    observed = float(bleu_from_stats(ref.sum(0)) - bleu_from_stats(oth.sum(0)))
    return _paired_result(observed, bootstrap_bleu(ref, w) - bootstrap_bleu(oth, w), level)
