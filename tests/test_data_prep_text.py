"""Sentence splitting and truncation: same results as the original (quadratic) code, linear work."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from data_prep import text as T
from data_prep.synthetic import iter_texts
from data_prep.text import HFTokenCounter, split_sentences, truncate, truncate_pieces

REAL_SAMPLES = Path(__file__).resolve().parent / "fixtures" / "real_abstract_generation.jsonl"


# --- the original implementation, kept as the oracle (fine on small inputs, quadratic on big ones) ---

_OLD_END = re.compile(r"([.!?…]+)([\"'”’)\]]*)(\s+)")
_OLD_WORD_BEFORE = re.compile(r"(\S+)$")


def _old_is_false_end(text: str, match: re.Match) -> bool:
    punct, after = match.group(1), text[match.end():match.end() + 1]
    if after and after.islower():
        return True
    if punct != ".":
        return False
    before = _OLD_WORD_BEFORE.search(text, 0, match.start())
    if before is None:
        return False
    word = before.group(1).lstrip("\"'“‘([{")
    lowered = word.lower()
    if lowered in T.ABBREVIATIONS or (lowered in T.NUMBER_ABBREVIATIONS and after.isdigit()):
        return True
    if T._INITIALS.match(word) or (len(word) == 1 and word.isupper()):
        return True
    if word.isdigit() and len(word) <= 3:
        line_start = text.rfind("\n", 0, before.start()) + 1
        lead = text[line_start:before.start()].strip()
        return lead == "" or lead.endswith(":")
    return False


def old_split(text: str) -> list[str]:
    if not text:
        return []
    starts = {0, len(text)}
    starts |= {m.end() for m in _OLD_END.finditer(text) if not _old_is_false_end(text, m)}
    starts |= {m.end() for m in T._CJK_END.finditer(text)}
    starts |= {m.start() + 1 for m in T._LIST_LINE.finditer(text)}
    starts |= {m.end() for m in T._BLANK_LINE.finditer(text)}
    starts |= {i for i, char in enumerate(text) if char == "•" and i > 0}
    bounds = sorted(starts)
    pieces: list[str] = []
    for begin, end in zip(bounds, bounds[1:]):
        piece = text[begin:end]
        if pieces and (not piece.strip() or not pieces[-1].strip()):
            pieces[-1] += piece
        else:
            pieces.append(piece)
    return pieces


def old_truncate_pieces(pieces: Sequence[str], max_tokens: int, counter) -> T.Truncated:
    full = "".join(pieces).strip()
    total = counter.count(full)
    if total <= max_tokens:
        return T.Truncated(full, total, False)
    if max_tokens == 0:
        return T.Truncated("", 0, True)
    per_piece = [counter.count(p.strip()) for p in pieces]
    n, running = 0, 0
    while n < len(pieces) and running + per_piece[n] <= max_tokens:
        running += per_piece[n]
        n += 1
    prefix = lambda k: "".join(pieces[:k]).strip()
    while n > 0 and counter.count(prefix(n)) > max_tokens:
        n -= 1
    while n + 1 < len(pieces) and counter.count(prefix(n + 1)) <= max_tokens:
        n += 1
    if n == 0 or not prefix(n):
        first = next((p for p in pieces if p.strip()), "").strip()
        n = max_tokens
        while n > 0:
            kept = counter.cut(first, n).rstrip()
            count = counter.count(kept)
            if count <= max_tokens:
                return T.Truncated(kept, count, True)
            n -= max(1, count - max_tokens)
        return T.Truncated("", 0, True)
    return T.Truncated(prefix(n), counter.count(prefix(n)), True)


class WordCounter:
    """Whitespace 'tokens'; counts the characters it is given, to bound the tokenising work."""

    def __init__(self) -> None:
        self.chars = 0

    def count(self, text: str) -> int:
        self.chars += len(text)
        return len(text.split())

    def cut(self, text: str, n: int) -> str:
        self.chars += len(text)
        words = list(re.finditer(r"\S+", text))
        return text[:words[n - 1].end()] if len(words) >= n else text


class CountingHF(HFTokenCounter):
    """The real tokenizer counter, counting the characters it tokenises."""

    chars = 0

    def count(self, text: str) -> int:
        self.chars += len(text)
        return super().count(text)

    def counts(self, texts):
        self.chars += sum(map(len, texts))
        return super().counts(texts)

    def cutter(self, text: str):
        self.chars += len(text)
        return super().cutter(text)


@pytest.fixture(scope="module")
def tok():
    from flythinker_worker.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


# Pieces of text rich in the splitter's edge cases: abbreviations, numbers, list markers, quotes,
# CJK stops, bullets, odd whitespace (NBSP, line separator), "word\n." (the old regex's `$` quirk).
ATOMS = ["e.g", "U.S", "Dr", "no", "No", "5", "12", "2019", "J", "x", "Word", "word", "al", ":", "(", "\"",
         "'", "“", "”", "’", ")", "]", ".", ".", ".", "!", "?", "…", "。", "！", " ", " ", " ", "\n", "\n",
         "\t", "•", "-", "*", "·", "\u00a0", "\u2028", "1)", "a.b", "Fig", "Ünï", "Grüße"]


def random_texts(seed: int, n: int, max_atoms: int = 30) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ATOMS) for _ in range(rng.randint(0, max_atoms))) for _ in range(n)]


def corpus() -> list[str]:
    texts = list(iter_texts(users=6, records_per_user=3))
    for line in REAL_SAMPLES.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["input"], record["target"]]
    return texts


def test_split_equals_the_original_on_random_and_real_texts():
    texts = random_texts(0, 20000) + corpus()
    mismatches = [t for t in texts if split_sentences(t) != old_split(t)]
    assert not mismatches, mismatches[:3]
    # The oracle is not trivially empty: the random texts do get split, in many ways.
    assert sum(len(old_split(t)) > 2 for t in texts) > 5000


def test_truncate_equals_the_original(tok, monkeypatch):
    rng = random.Random(1)
    texts = random_texts(2, 600, max_atoms=60) + corpus()[:200]
    cases = [(t, rng.randint(0, 40)) for t in texts]
    for counter in (HFTokenCounter(tok), WordCounter()):
        for text, budget in cases:
            assert truncate(text, budget, counter) == old_truncate_pieces(old_split(text), budget, counter)
    # History pieces may be blank ("\n" for an empty item): the same results there too.
    for _ in range(500):
        pieces = [rng.choice(["\n", "A. ", "B c. ", "", "  ", "word word\n"]) for _ in range(rng.randint(0, 12))]
        budget = rng.randint(0, 10)
        assert truncate_pieces(pieces, budget, WordCounter()) == old_truncate_pieces(pieces, budget, WordCounter())
    # With a tiny first window, the windowed counting of long texts is exercised on these inputs too.
    monkeypatch.setattr(T, "_window", lambda max_tokens: 6)
    for text, budget in cases[:300]:
        assert truncate(text, budget, WordCounter()) == old_truncate_pieces(old_split(text), budget, WordCounter())


def huge_record(megabytes: float) -> tuple[str, int]:
    """A record of about `megabytes` MB on one line, built from blocks whose sentence count is known,
    plus a run of a million dots that no whitespace follows (the original `_END` regex took minutes
    on 50k of them) and a million-character word."""
    block = ("It costs 5.0 dollars, e.g. in the U.S. today. Dr. Smith et al. agree. No. 5 is fine. "
             "Items: 1. Alpha and 2. Beta. Results rose in 2019. I said no. ")
    per_block = len(old_split(block))
    repeats = int(megabytes * 1e6 / len(block))
    text = block * repeats + "Wait" + "." * 1_000_000 + "x. " + "W" * 1_000_000 + ". End."
    return text, per_block * repeats + 3


def test_split_huge_single_record_in_linear_time():
    """10 MB in one record: seconds here. The original took a minute for 0.3 MB (8k sentences) and,
    being quadratic (worse on the dot run), would need hours for this; the test times out at 900 s."""
    text, expected = huge_record(10)
    pieces = split_sentences(text)
    assert len(pieces) == expected and "".join(pieces) == text
    assert pieces[-3:] == ["Wait" + "." * 1_000_000 + "x. ", "W" * 1_000_000 + ". ", "End."]


class CountingStr(str):
    """A str that counts the characters Python code reads from it by indexing or slicing (what the
    regexes read is linear by construction; this bounds the backward scans written in Python)."""

    reads = 0

    def __getitem__(self, key):
        value = str.__getitem__(self, key)
        CountingStr.reads += len(value)
        return value


def test_split_reads_each_character_a_bounded_number_of_times():
    # Long lines of numbers after blanks and words: a backward scan per sentence end that went to
    # the start of the text or of the line would read O(n^2) characters.
    text = CountingStr(("x 1. " + " " * 50 + "word. " + "U.S. ") * 4000)
    CountingStr.reads = 0
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert CountingStr.reads <= 4 * len(text)


@pytest.mark.parametrize("shape", ["sentences", "one_sentence"])
def test_truncate_huge_text_tokenises_only_near_the_cut(tok, shape):
    text = huge_record(2)[0] if shape == "sentences" else "word " * 400_000
    counter = CountingHF(tok)
    result = truncate(text, 100, counter)
    assert 0 < result.n_tokens <= 100 and text.startswith(result.text) and result.cut
    # The original tokenised the 2 MB text whole several times; now only windows near the cut.
    assert counter.chars < 50_000
