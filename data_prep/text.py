"""Sentence splitting and token-budget truncation for LongLaMP text.

`split_sentences` cuts a text into pieces that concatenate back to the text exactly; a piece ends
after sentence punctuation and its trailing whitespace. It does not split decimals ("5.0"),
abbreviations ("e.g.", "U.S.", "Dr.", "et al."), initials ("J. Smith") or list markers at the start
of a line ("1. Pattern recognition"), and it does split before list items on new lines and before
bullets ("•"), which real LongLaMP keyword lists and abstracts use.

`truncate` keeps the longest prefix of whole pieces that fits a token budget. Only when even the
first piece does not fit is the text cut inside a sentence, at a token boundary.

Both are linear in the text (a record can be tens of MB): splitting reads each character a bounded
number of times, and truncation tokenises only text near the cut, never a huge text whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from itertools import accumulate
from dataclasses import dataclass
from typing import Protocol

# Words that end with a period without ending the sentence, compared lowercased and without the
# final period. Month names like "may"/"mar" are left out: they end sentences too often.
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "al", "cf", "approx", "ca",
    "inc", "ltd", "co", "corp", "dept", "univ", "viz", "resp", "e.g", "i.e", "u.s", "u.k", "u.s.a",
    "ph.d", "a.m", "p.m", "jan", "feb", "apr", "aug", "sep", "sept", "oct", "nov", "dec",
})
# Abbreviations that only read as such before a number ("No. 5", "Fig. 3", "pp. 12"); "I said no."
# must still end a sentence.
NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "vol", "vols", "pp", "p", "fig", "figs", "eq", "eqs",
                                  "ch", "sec", "ref", "refs", "art", "op", "tab"})

# Terminal punctuation (a run, so "?!" and "..." count once), optional closing quotes/brackets,
# then the whitespace that separates it from the next sentence. The lookbehind and the possessive
# runs keep the scan linear: a match may only start where a punctuation run starts (one starting
# inside a run fails whenever the run's start does), so a run of dots with no whitespace after it
# is not re-scanned from each of its characters (the plain pattern took minutes on 50k dots).
_END = re.compile(r"(?<![.!?…])([.!?…]++)([\"'”’)\]]*+)(\s+)")
# CJK full stops need no following space.
_CJK_END = re.compile(r"[。！？]+")
# A line that starts a list item: "1. ", "2) ", "- ", "* ", "• ".
_LIST_LINE = re.compile(r"\n[ \t]*(?:\d{1,3}[.)](?:\s|$)|[-*•·]\s?)")
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_BULLET = re.compile(r"•")
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]?$")


def _word_before(text: str, end: int) -> tuple[int, int] | None:
    """Span of the word that `re.search(r"(\\S+)$", text[:end])` finds: the non-space run ending at
    `end` or (`$` also matches before a final newline) the one ending at a newline at `end - 1`."""
    if end > 0 and text[end - 1] == "\n":
        end -= 1
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return (start, end) if start < end else None


def _starts_list_item(text: str, word_start: int) -> bool:
    """True when only whitespace, or a colon, precedes `word_start` on its line."""
    i = word_start - 1
    while i >= 0 and text[i] != "\n" and text[i].isspace():
        i -= 1
    return i < 0 or text[i] in "\n:"


def _is_false_end(text: str, match: re.Match) -> bool:
    """True when the punctuation at `match` does not end a sentence.

    Reads only the word before `match` and the blanks before that word, scanning backwards: every
    `_END` match ends in whitespace, so no two matches read the same word and the split stays
    linear (a search from the start of the text for each match made it quadratic).
    """
    punct = match.group(1)
    after = text[match.end():match.end() + 1]
    if after and after.islower():
        # "approx. five", "etc. and": a lowercase continuation is the same sentence.
        return True
    if punct != ".":
        return False
    span = _word_before(text, match.start())
    if span is None:
        return False
    word = text[span[0]:span[1]].lstrip("\"'“‘([{")
    lowered = word.lower()
    if lowered in ABBREVIATIONS:
        return True
    if lowered in NUMBER_ABBREVIATIONS and after.isdigit():
        return True
    if _INITIALS.match(word) or (len(word) == 1 and word.isupper()):
        return True  # "U.S.", "e.g.", "J. Smith"
    if word.isdigit() and len(word) <= 3:
        # A list marker "1." at the start of a line or right after a colon ("items: 1. Pattern"),
        # not a number that ends a sentence ("in 2019.", "we tested 12.").
        return _starts_list_item(text, span[0])
    return False


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentence pieces; `"".join(pieces) == text` always holds.

    Whitespace after a sentence stays with that sentence, so a prefix of pieces is a clean cut.
    Linear in the length of `text`.
    """
    if not text:
        return []
    starts = {0, len(text)}
    for match in _END.finditer(text):
        if not _is_false_end(text, match):
            starts.add(match.end())
    for match in _CJK_END.finditer(text):
        starts.add(match.end())
    for match in _LIST_LINE.finditer(text):
        starts.add(match.start() + 1)  # the newline stays with the previous line
    for match in _BLANK_LINE.finditer(text):
        starts.add(match.end())
    for match in _BULLET.finditer(text, 1):
        starts.add(match.start())
    bounds = sorted(starts)
    # A piece of only whitespace (e.g. between a list-line start and a blank line) joins its
    # neighbour; so does any piece after a first piece that is only whitespace. Pieces are cut once
    # at the end (no repeated string concatenation).
    piece_starts: list[int] = []
    last_blank = False
    for begin, end in zip(bounds, bounds[1:]):
        blank = text[begin:end].isspace()
        if piece_starts and (blank or last_blank):
            last_blank = last_blank and blank
            continue
        piece_starts.append(begin)
        last_blank = blank
    piece_ends = piece_starts[1:] + [len(text)]
    return [text[begin:end] for begin, end in zip(piece_starts, piece_ends)]


class TokenCounter(Protocol):
    """What truncation needs from a tokenizer: count tokens, cut to the first n tokens."""

    def count(self, text: str) -> int: ...

    def cut(self, text: str, n_tokens: int) -> str: ...


class HFTokenCounter:
    """TokenCounter over a Hugging Face tokenizer; counts the text alone (no special tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def counts(self, texts: Sequence[str]) -> list[int]:
        """Token counts of several texts in one batched call."""
        if not texts:
            return []
        # An empty string in a batch is fine for the tokenizer and counts 0.
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def cut(self, text: str, n_tokens: int) -> str:
        return self.cutter(text)(n_tokens)

    def cutter(self, text: str) -> Callable[[int], str]:
        """`n -> cut(text, n)` that tokenises `text` once, however many cuts are asked for."""
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

            def fast_cut(n_tokens: int) -> str:
                if n_tokens <= 0:
                    return ""
                if len(offsets) <= n_tokens:
                    return text
                # Cut where token n_tokens-1 ends: a clean token boundary in the text.
                return text[:offsets[n_tokens - 1][1]]

            return fast_cut
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return lambda n_tokens: (self.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)
                                 if n_tokens > 0 else "")


@dataclass(frozen=True)
class Truncated:
    """A text cut to a budget: the text kept, its token count, and whether anything was cut."""

    text: str
    n_tokens: int
    cut: bool


def _window(max_tokens: int) -> int:
    # Characters tokenised first when a text may be far over budget: real tokenizers average well
    # over one character per token, so this window usually holds several budgets' worth of tokens.
    return max(1024, 8 * max_tokens)


def _enough(max_tokens: int) -> int:
    # A window cut mid-word may tokenise its last word differently from the whole text; a window
    # holding this many tokens is over budget (and cuts at max_tokens match the whole text's) by
    # a wide margin.
    return 2 * max_tokens + 16


def _count_capped(text: str, cap: int, counter: TokenCounter) -> int:
    """`count(text)` when that is <= cap; otherwise some number > cap, found from growing prefixes
    of `text`, so a huge text is never tokenised whole (fast tokenizers slow down more than
    linearly on one huge input)."""
    window = _window(cap)
    while window < len(text):
        count = counter.count(text[:window])
        if count > _enough(cap):
            return count
        window *= 4
    return counter.count(text)


def _token_cut(text: str, max_tokens: int, counter: TokenCounter) -> Truncated:
    # The first max_tokens tokens are cut from a head of `text` that holds well over that many
    # tokens (see `_enough`), tokenised once; a huge `text` is never tokenised whole.
    window = _window(max_tokens)
    while True:
        head = text[:window]
        cut = counter.cutter(head) if hasattr(counter, "cutter") else partial(counter.cut, head)
        if window >= len(text) or cut(_enough(max_tokens)) != head:
            break
        window *= 4
    # Re-tokenising a cut prefix can give one token more than the ids it came from (a multi-byte
    # character split across byte-level tokens), so shrink until the budget really holds.
    n = max_tokens
    while n > 0:
        kept = cut(n).rstrip()
        count = counter.count(kept)
        if count <= max_tokens:
            return Truncated(kept, count, True)
        n -= max(1, count - max_tokens)
    return Truncated("", 0, True)


def _estimate(pieces: Sequence[str], max_tokens: int, counter: TokenCounter) -> tuple[int, list[int]]:
    """How many leading pieces fit by the sum of their own token counts, and the counts taken.
    Pieces are counted in growing batches, only until the budget is exceeded, and a long piece
    through `_count_capped`: a huge text is not tokenised whole."""
    n, running, batch, taken = 0, 0, 32, []
    long = _window(max_tokens)
    while n < len(pieces):
        # Stripped: a piece's trailing space merges into the next word's first token when joined.
        chunk = [p.strip() for p in pieces[n:n + batch]]
        short = [p for p in chunk if len(p) <= long]
        counted = iter(counter.counts(short) if hasattr(counter, "counts") else map(counter.count, short))
        for piece in chunk:
            count = next(counted) if len(piece) <= long else _count_capped(piece, max_tokens, counter)
            taken.append(count)
            if running + count > max_tokens:
                return n, taken
            running += count
            n += 1
        batch *= 2
    return n, taken


def truncate_pieces(pieces: Sequence[str], max_tokens: int, counter: TokenCounter) -> Truncated:
    """The longest prefix of `pieces` (whole sentences) whose stripped text has <= max_tokens tokens.

    If the whole text fits it is kept (stripped); if not even the first piece fits, the first piece
    is cut at a token boundary (the only case that cuts inside a sentence). Token counts are taken
    to grow with the prefix; the work is a few tokenisations of the text near the cut, not of every
    prefix (nor, when it cannot fit, of the whole text).
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    joined = "".join(pieces)
    if max_tokens == 0:
        return Truncated("", 0, bool(joined.strip()))
    ends = list(accumulate(len(p) for p in pieces))
    counts: dict[int, int] = {0: 0}

    def prefix(k: int) -> str:
        return joined[:ends[k - 1]].strip() if k else ""

    def fits(k: int) -> bool:
        if k not in counts:
            counts[k] = _count_capped(prefix(k), max_tokens, counter)
        return counts[k] <= max_tokens

    # Start from the per-piece estimate (token counts are nearly, not exactly, additive across
    # pieces), gallop to a bracket [fits, does not fit], then bisect it: O(log) exact counts.
    total = len(pieces)
    estimate, taken = _estimate(pieces, max_tokens, counter)
    if taken:
        counts[1] = taken[0]  # prefix(1) is the first piece, stripped: already counted
    lo, hi = 0, None  # the most pieces known to fit, the fewest known not to (prefix(0) fits)
    step = 1
    if fits(estimate):
        lo = estimate
        while hi is None and lo < total:
            k = min(lo + step, total)
            lo, hi = (k, None) if fits(k) else (lo, k)
            step *= 2
    else:
        hi = estimate
        while not fits(max(hi - step, 0)):
            hi = max(hi - step, 0)
            step *= 2
        lo = max(hi - step, 0)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if hi is None:  # the whole text fits
        return Truncated(prefix(total), counts[total], False)
    if lo == 0 or not prefix(lo):
        first = next((p for p in pieces if p.strip()), "")
        return _token_cut(first.strip(), max_tokens, counter)
    return Truncated(prefix(lo), counts[lo], True)


def truncate(text: str, max_tokens: int, counter: TokenCounter) -> Truncated:
    """Cut `text` to at most `max_tokens` tokens at a sentence boundary (see `truncate_pieces`)."""
    return truncate_pieces(split_sentences(text), max_tokens, counter)
