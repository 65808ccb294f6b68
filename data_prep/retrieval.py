"""Which profile items go into the prompt: BM25 (LongLaMP's retriever), most recent, or none.

All orders are deterministic: equal scores keep the profile's own order (stable sort on index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from data_prep.tasks import TaskSpec

RETRIEVERS = ("bm25", "recent", "none")


def bm25_order(documents: Sequence[str], query: str) -> list[int]:
    """Indices of `documents` by BM25Okapi score against `query`, best first, ties by index.

    Tokens are lowercased whitespace splits, as LongLaMP's `x.split()` plus lowercasing (so "The"
    and "the" match). Documents that are all empty cannot be scored (BM25 divides by the mean
    length) and keep their order.
    """
    from rank_bm25 import BM25Okapi

    corpus = [doc.lower().split() for doc in documents]
    if not corpus or not any(corpus):
        return list(range(len(corpus)))
    scores = BM25Okapi(corpus).get_scores(query.lower().split())
    return sorted(range(len(corpus)), key=lambda i: (-float(scores[i]), i))


def _year(item: dict[str, Any], key: str) -> float:
    value = item.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return -math.inf


def recent_order(profile: Sequence[dict[str, Any]], recency_key: str | None) -> list[int]:
    """Indices of `profile`, most recent first.

    LongLaMP profiles carry no dates for reviews and reddit posts, so list order stands for time and
    the last item is the most recent (LongLaMP's own "recency" retriever takes `profile[-k:][::-1]`).
    Abstracts carry a `year`: newer years first, list order (later first) within a year; items
    without a usable year count as oldest.
    """
    indices = range(len(profile))
    if recency_key is None:
        return list(reversed(indices))
    return sorted(indices, key=lambda i: (_year(profile[i], recency_key), i), reverse=True)


def select_history(profile: Sequence[dict[str, Any]], query: str, spec: TaskSpec, k: int,
                   retriever: str) -> list[dict[str, Any]]:
    """The `k` profile items to show for `query`, in prompt order (most relevant/recent first)."""
    if retriever not in RETRIEVERS:
        raise ValueError(f"unknown retriever {retriever!r}; expected one of {', '.join(RETRIEVERS)}")
    if k < 0:
        raise ValueError(f"history k must be >= 0, got {k}")
    if retriever == "none" or k == 0 or not profile:
        return []
    if retriever == "bm25":
        order = bm25_order([spec.corpus_text(item) for item in profile], spec.bm25_query(query))
    else:
        order = recent_order(profile, spec.recency_key)
    return [profile[i] for i in order[:k]]
