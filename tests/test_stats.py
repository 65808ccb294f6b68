"""evaluation.stats against independent computations: slow per-resample loops over the same draws
(sacrebleu's corpus BLEU called on each resampled corpus), a known distribution, constructed paired cases."""

import math
import time

import numpy as np
import pytest
import sacrebleu

from evaluation import stats
from evaluation.metrics import bleu_stats

WORDS = "the a cat dog sat ran on under mat rug home quickly slowly it was is".split()


def _corpus(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    refs = [" ".join(rng.choice(WORDS, rng.integers(3, 25))) for _ in range(n)]
    preds = []
    for ref in refs:  # a noisy copy: some words kept, some replaced, some rows short or empty
        words = [w if rng.random() < 0.6 else str(rng.choice(WORDS)) for w in ref.split()]
        preds.append(" ".join(words[: rng.integers(0, len(words) + 1)]))
    return preds, refs


def test_resample_indices_are_seeded_and_weights_count_them():
    a, b = stats.resample_indices(7, 50, seed=3), stats.resample_indices(7, 50, seed=3)
    assert np.array_equal(a, b) and a.shape == (50, 7) and a.min() >= 0 and a.max() < 7
    assert not np.array_equal(a, stats.resample_indices(7, 50, seed=4))
    w = stats.resample_weights(7, 50, seed=3)
    for row, idx in zip(w, a):
        assert np.array_equal(row, np.bincount(idx, minlength=7))


def test_mean_ci_equals_a_slow_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    values = list(rng.normal(50, 10, 40))
    values[3] = None  # a missing row: out of every resample's mean
    idx = stats.resample_indices(len(values), 200, seed=1)
    slow = []
    for row in idx:
        kept = [values[i] for i in row if values[i] is not None]
        slow.append(sum(kept) / len(kept))
    lo, hi = np.percentile(slow, [2.5, 97.5])
    assert stats.mean_ci(values, 200, seed=1) == pytest.approx((lo, hi), rel=1e-12)


def test_mean_ci_known_distribution():
    # Normal data: the bootstrap CI of the mean is close to mean +- 1.96 sd / sqrt(n).
    x = np.random.default_rng(5).normal(10.0, 2.0, 2000)
    lo, hi = stats.mean_ci(list(x), 2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert stats.mean_ci([None, None], 10) is None and stats.mean_ci([], 10) is None


def test_bleu_from_stats_reproduces_sacrebleu():
    preds, refs = _corpus(60, seed=0)
    per_row = bleu_stats(preds, refs)
    full = sacrebleu.corpus_bleu(preds, [refs], tokenize="13a").score
    assert stats.bleu_from_stats(per_row.sum(0)) == pytest.approx(full, rel=1e-12)
    # short corpora hit the smoothing and early-exit branches: zero 4-gram matches, no matches, no n-grams
    for k in (1, 2, 3, 5):
        for start in range(0, 60, k):
            p, r = preds[start:start + k], refs[start:start + k]
            want = sacrebleu.corpus_bleu(p, [r], tokenize="13a").score
            assert stats.bleu_from_stats(per_row[start:start + k].sum(0)) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert stats.bleu_from_stats(bleu_stats([""], ["a b c"]).sum(0)) == 0.0


def test_corpus_bleu_ci_equals_sacrebleu_on_each_resample():
    preds, refs = _corpus(50, seed=1)
    idx = stats.resample_indices(50, 40, seed=2)
    slow = [sacrebleu.corpus_bleu([preds[i] for i in row], [[refs[i] for i in row]], tokenize="13a").score
            for row in idx]
    fast = stats.bootstrap_bleu(bleu_stats(preds, refs), stats.resample_weights(50, 40, seed=2))
    assert fast == pytest.approx(slow, rel=1e-10)
    lo, hi = np.percentile(slow, [2.5, 97.5])
    assert stats.corpus_bleu_ci(bleu_stats(preds, refs), 40, seed=2) == pytest.approx((lo, hi), rel=1e-10)


def test_paired_identical_systems_give_p_one():
    x = list(np.random.default_rng(0).uniform(0, 100, 300))
    r = stats.paired_mean_test(x, x, 500, seed=0)
    assert r["delta"] == 0 and r["p_value"] == 1.0 and r["ci"] == (0.0, 0.0)
    s = bleu_stats(*_corpus(80, seed=3))
    rb = stats.paired_bleu_test(s, s, 500, seed=0)
    assert rb["delta"] == 0 and rb["p_value"] == 1.0


def test_paired_better_on_every_row_gives_p_near_zero():
    rng = np.random.default_rng(1)
    other = rng.uniform(20, 60, 300)
    ref = other + rng.uniform(1, 3, 300)  # better on every row
    r = stats.paired_mean_test(list(ref), list(other), 1000, seed=0)
    assert r["delta"] == pytest.approx((ref - other).mean())
    assert r["p_value"] == pytest.approx(1 / 1001) and r["ci"][0] > 0
    # the slow definition over the same draws
    idx = stats.resample_indices(300, 1000, seed=0)
    deltas = np.array([(ref[i] - other[i]).mean() for i in idx])
    slow_p = (1 + np.sum(np.abs(deltas - deltas.mean()) >= abs(r["delta"]))) / 1001
    assert r["p_value"] == pytest.approx(slow_p)
    # a system that copies the reference exactly is better in BLEU than a noisy one
    preds, refs = _corpus(200, seed=4)
    rb = stats.paired_bleu_test(bleu_stats(refs, refs), bleu_stats(preds, refs), 1000, seed=0)
    assert rb["delta"] > 0 and rb["p_value"] < 0.01


def test_paired_noise_is_not_significant():
    rng = np.random.default_rng(2)
    a, b = rng.normal(50, 5, 400), rng.normal(50, 5, 400)  # same distribution
    r = stats.paired_mean_test(list(a), list(b), 1000, seed=0)
    assert r["ci"][0] < 0 < r["ci"][1] and r["p_value"] > 0.05


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="n_resamples"):
        stats.mean_ci([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="equal"):
        stats.paired_mean_test([1.0, 2.0], [1.0], 10)
    with pytest.raises(ValueError, match=r"\(rows, 10\)"):
        stats.corpus_bleu_ci(np.zeros((3, 4)), 10)


def test_bootstrap_is_fast_for_a_test_split():
    # 1.8k rows (LongLaMP product-review test size), 4 systems, 4 metrics + corpus BLEU, 1000 resamples.
    n, systems = 1800, 4
    rng = np.random.default_rng(0)
    s = np.abs(rng.normal(20, 8, (n, 10))).round()
    start = time.perf_counter()
    for _ in range(systems):
        w = stats.resample_weights(n, 1000, seed=0)
        for _ in range(4):
            stats.percentile_ci(stats.bootstrap_means(list(rng.uniform(0, 100, n)), w))
        stats.percentile_ci(stats.bootstrap_bleu(s, w))
    assert time.perf_counter() - start < 10.0
