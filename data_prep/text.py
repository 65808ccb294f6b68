"""Sentence splitting and token-budget truncation for LongLaMP text.

`split_sentences` cuts a text into pieces that concatenate back to the text exactly; a piece ends
after sentence punctuation and its trailing whitespace. It does not split decimals ("5.0"),
abbreviations ("e.g.", "U.S.", "Dr.", "et al."), initials ("J. Smith") or list markers at the start
of a line ("1. Pattern recognition"), and it does split before list items on new lines and before
bullets ("•"), which real LongLaMP keyword lists and abstracts use.

`truncate` keeps the longest prefix of whole pieces that fits a token budget. Only when even the
first piece does not fit is the text cut inside a sentence, at a token boundary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
# then the whitespace that separates it from the next sentence.
_END = re.compile(r"([.!?…]+)([\"'”’)\]]*)(\s+)")
# CJK full stops need no following space.
_CJK_END = re.compile(r"[。！？]+")
# A line that starts a list item: "1. ", "2) ", "- ", "* ", "• ".
_LIST_LINE = re.compile(r"\n[ \t]*(?:\d{1,3}[.)](?:\s|$)|[-*•·]\s?)")
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]?$")
_WORD_BEFORE = re.compile(r"(\S+)$")


def _is_false_end(text: str, match: re.Match) -> bool:
    """True when the punctuation at `match` does not end a sentence."""
    punct = match.group(1)
    after = text[match.end():match.end() + 1]
    if after and after.islower():
        # "approx. five", "etc. and": a lowercase continuation is the same sentence.
        return True
    if punct != ".":
        return False
    before = _WORD_BEFORE.search(text, 0, match.start())
    if before is None:
        return False
    word = before.group(1).lstrip("\"'“‘([{")
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
        line_start = text.rfind("\n", 0, before.start()) + 1
        lead = text[line_start:before.start()].strip()
        return lead == "" or lead.endswith(":")
    return False


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentence pieces; `"".join(pieces) == text` always holds.

    Whitespace after a sentence stays with that sentence, so a prefix of pieces is a clean cut.
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
    for index, char in enumerate(text):
        if char == "•" and index > 0:
            starts.add(index)
    bounds = sorted(starts)
    # A piece of only whitespace (e.g. between a list-line start and a blank line) joins its neighbour.
    pieces: list[str] = []
    for begin, end in zip(bounds, bounds[1:]):
        piece = text[begin:end]
        if pieces and not piece.strip():
            pieces[-1] += piece
        elif pieces and not pieces[-1].strip():
            pieces[-1] += piece
        else:
            pieces.append(piece)
    return pieces


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
        if n_tokens <= 0:
            return ""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            if len(offsets) <= n_tokens:
                return text
            # Cut at the character where token n_tokens-1 ends: a clean token boundary in the text.
            return text[:offsets[n_tokens - 1][1]]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)


@dataclass(frozen=True)
class Truncated:
    """A text cut to a budget: the text kept, its token count, and whether anything was cut."""

    text: str
    n_tokens: int
    cut: bool


def _token_cut(text: str, max_tokens: int, counter: TokenCounter) -> Truncated:
    # Re-tokenising a cut prefix can give one token more than the ids it came from (a multi-byte
    # character split across byte-level tokens), so shrink until the budget really holds.
    n = max_tokens
    while n > 0:
        kept = counter.cut(text, n).rstrip()
        count = counter.count(kept)
        if count <= max_tokens:
            return Truncated(kept, count, True)
        n -= max(1, count - max_tokens)
    return Truncated("", 0, True)


def truncate_pieces(pieces: Sequence[str], max_tokens: int, counter: TokenCounter) -> Truncated:
    """The longest prefix of `pieces` (whole sentences) whose stripped text has <= max_tokens tokens.

    If the whole text fits it is kept (stripped); if not even the first piece fits, the first piece
    is cut at a token boundary (the only case that cuts inside a sentence).
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    full = "".join(pieces).strip()
    total = counter.count(full)
    if total <= max_tokens:
        return Truncated(full, total, False)
    if max_tokens == 0:
        return Truncated("", 0, True)
    # Estimate the cut from per-piece counts, then correct it against exact counts of the prefix
    # (token counts are nearly, not exactly, additive across pieces).
    # Stripped: a piece's trailing space merges into the next word's first token when joined.
    stripped = [p.strip() for p in pieces]
    per_piece = counter.counts(stripped) if hasattr(counter, "counts") else [counter.count(p) for p in stripped]
    n, running = 0, 0
    while n < len(pieces) and running + per_piece[n] <= max_tokens:
        running += per_piece[n]
        n += 1

    def prefix(k: int) -> str:
        return "".join(pieces[:k]).strip()

    while n > 0 and counter.count(prefix(n)) > max_tokens:
        n -= 1
    while n + 1 < len(pieces) and counter.count(prefix(n + 1)) <= max_tokens:
        n += 1
    if n == 0 or not prefix(n):
        first = next((p for p in pieces if p.strip()), "")
        return _token_cut(first.strip(), max_tokens, counter)
    kept = prefix(n)
    return Truncated(kept, counter.count(kept), True)


def truncate(text: str, max_tokens: int, counter: TokenCounter) -> Truncated:
    """Cut `text` to at most `max_tokens` tokens at a sentence boundary (see `truncate_pieces`)."""
    return truncate_pieces(split_sentences(text), max_tokens, counter)
