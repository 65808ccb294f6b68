"""Synthetic LongLaMP: records in the exact raw schema of the three tasks, with a real per-user signal.

    python -m data_prep.synthetic --out data/synthetic            # DIR/<task>/{train,val,test}.jsonl
    python -m data_prep.longlamp --task product_review --source data/synthetic/product_review --out ...

Each user has consistent traits that show in both their profile and their outputs: a unique
two-word signature phrase (in ~90% of their texts), favourite adjectives and an intensifier, an
opener and a closer, a typical length, punctuation habits, favourite topics, and per task a rating
habit (reviews), a keyword-list style and verb (abstracts), or lowercase/slang/TL;DR habits
(reddit). Topic words follow the query, style words follow the user, so a model that reads the
retrieved history can reproduce the style and one that does not cannot.

`--preset demo` (make demo) writes short reviews (2-3 body sentences) in which every text carries the
user's opener and signature closer; the default `longlamp` keeps LongLaMP-like lengths. The CLI prints
the history signal: how many of a test output's words its own user's history holds vs another user's.

`--setting user` (default, like LongLaMP's user-based split) gives train/val/test disjoint users;
`temporal` puts every user in every split (their last two records to val and test).
Deterministic for a seed: every draw comes from `random.Random` seeded by (seed, task, user).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from data_prep import synthetic_vocab as V
from data_prep.tasks import TASKS, get_spec
from flythinker_worker.tiny import DEFAULT_SYSTEM_PROMPT
from flythinker_worker.utils import atomic_directory, write_text_atomic

SPLITS = ("train", "val", "test")
HISTORY_DOCS = 8           # documents per user that profiles are drawn from
PROFILE_SIZE = (4, 8)      # profile items per record (inclusive range)
SIGNATURE_RATE = 0.9       # share of a user's texts that carry the signature phrase


@dataclass(frozen=True)
class Preset:
    """How long and how regular the texts are. `longlamp` (default) mimics LongLaMP's lengths; `demo`
    (make demo) writes short reviews in which the user's traits are always present: an opener and the
    signature closer in every text, 2-3 body sentences. Both keep the same per-user traits."""

    sentences: tuple[int, int] = (3, 7)   # a user's typical number of body sentences (inclusive range)
    signature_rate: float = SIGNATURE_RATE
    always_opener: bool = False            # True: no user without an opener


PRESETS = {"longlamp": Preset(), "demo": Preset(sentences=(2, 3), signature_rate=1.0, always_opener=True)}


@dataclass(frozen=True)
class UserStyle:
    """One synthetic user's consistent traits."""

    user_id: str
    signature: str
    adjectives: tuple[str, ...]
    intensifier: str
    topics: tuple[str, ...]
    n_sentences: int
    opener: str
    closer: str
    exclaim: float
    mean_rating: float = 4.0
    verb: tuple[str, str] = ("propose", "proposes")
    numbered_keywords: bool = True
    lowercase: bool = False
    slang: str = "tbh"
    emoticon: str = ""
    tldr: bool = False
    signature_rate: float = SIGNATURE_RATE


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _rng(seed: int, *parts: object) -> random.Random:
    # str seeds hash with sha512: stable across processes and PYTHONHASHSEED.
    return random.Random("-".join(str(p) for p in (seed, *parts)))


def get_preset(preset: str) -> Preset:
    """The named Preset; ValueError naming the choices otherwise."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def make_users(task: str, n_users: int, seed: int = 0, preset: str = "longlamp") -> list[UserStyle]:
    """The `n_users` users of `task`; user i is the same whatever n_users is (bar the signature)."""
    get_spec(task)
    style = get_preset(preset)
    pairs = list(product(V.SIGNATURE_ADJECTIVES, V.SIGNATURE_NOUNS))
    if not 1 <= n_users <= len(pairs):
        raise ValueError(f"users must be in 1..{len(pairs)}, got {n_users}")
    signatures = [" ".join(p) for p in _rng(seed, task, "signatures").sample(pairs, n_users)]
    pools = {"product_review": (V.PRODUCT_CATEGORIES, V.REVIEW_FAVORITE_ADJECTIVES, V.REVIEW_OPENERS,
                                V.REVIEW_CLOSERS),
             "abstract_generation": (V.RESEARCH_FIELDS, V.ABSTRACT_FAVORITE_ADJECTIVES,
                                     V.ABSTRACT_OPENERS, V.ABSTRACT_CLOSERS),
             "topic_writing": (V.REDDIT_TOPICS, V.REVIEW_FAVORITE_ADJECTIVES, ("",), V.REDDIT_CLOSERS)}
    topics, adjectives, openers, closers = pools[task]
    if style.always_opener and any(openers):
        openers = tuple(o for o in openers if o)
    users = []
    for i in range(n_users):
        rng = _rng(seed, task, "user", i)
        if task == "product_review":
            user_id = "A" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(13))
        elif task == "abstract_generation":
            # (first, last) pairs are distinct for i < 24 * 24; beyond that a number keeps names unique.
            user_id = f"{V.FIRST_NAMES[i % 24]} {V.LAST_NAMES[(i * 7 + i // 24) % 24]}"
            user_id += f" {i // 576 + 1}" if i >= 576 else ""
        else:
            user_id = f"{rng.choice(V.HANDLE_WORDS)}_{rng.choice(V.HANDLE_ANIMALS)}_{i}"
        users.append(UserStyle(
            user_id=user_id, signature=signatures[i],
            adjectives=tuple(rng.sample(adjectives, 3)), intensifier=rng.choice(V.INTENSIFIERS),
            topics=tuple(rng.sample(sorted(topics), 2)), n_sentences=rng.randint(*style.sentences),
            opener=rng.choice(openers), closer=rng.choice(closers), exclaim=rng.choice((0.0, 0.1, 0.6)),
            mean_rating=rng.choice((1.8, 2.6, 3.6, 4.3, 4.8)), verb=rng.choice(V.ABSTRACT_VERBS),
            numbered_keywords=rng.random() < 0.6, lowercase=rng.random() < 0.3,
            slang=rng.choice(V.REDDIT_SLANG), emoticon=rng.choice(V.REDDIT_EMOTICONS),
            tldr=rng.random() < 0.4, signature_rate=style.signature_rate))
    return users


def _topic(rng: random.Random, user: UserStyle, pool: dict[str, Any]) -> str:
    # Mostly the user's favourite topics, so BM25 finds same-topic history; sometimes any topic.
    return rng.choice(user.topics) if rng.random() < 0.8 else rng.choice(sorted(pool))


def _sentences(rng: random.Random, user: UserStyle, templates: Sequence[str], slots: dict[str, Any]
               ) -> list[str]:
    count = max(1, user.n_sentences + rng.choice((-1, 0, 0, 1)))
    chosen = rng.sample(list(templates), min(count, len(templates)))
    out = []
    for template in chosen:
        text = template.format(adj=rng.choice(user.adjectives), **slots)
        if text.endswith(".") and rng.random() < user.exclaim:
            text = text[:-1] + "!"
        out.append(text)
    return out


def _closing(rng: random.Random, user: UserStyle, slots: dict[str, Any]) -> list[str]:
    if rng.random() >= user.signature_rate:
        return []
    return [user.closer.format(sig=user.signature, Sig=_cap(user.signature), **slots)]


def _common_slots(rng: random.Random, user: UserStyle) -> dict[str, Any]:
    return {"intens": user.intensifier, "small": rng.randint(2, 9), "digit": rng.randint(0, 9),
            "duration": rng.choice(V.DURATIONS)}


def _review(rng: random.Random, user: UserStyle) -> tuple[dict[str, Any], str]:
    cat = V.PRODUCT_CATEGORIES[_topic(rng, user, V.PRODUCT_CATEGORIES)]
    rating = float(min(5, max(1, round(rng.gauss(user.mean_rating, 0.7)))))
    slots = dict(_common_slots(rng, user), product=rng.choice(cat["products"]),
                 feature=rng.choice(cat["features"]), material=rng.choice(cat["materials"]),
                 neg=rng.choice(V.REVIEW_NEGATIVE_ADJECTIVES), score=f"{rating:.1f}")
    templates = V.REVIEW_POSITIVE if rating >= 4 else V.REVIEW_NEUTRAL if rating == 3 else V.REVIEW_NEGATIVE
    body = ([user.opener] if user.opener else []) + _sentences(rng, user, templates, slots)
    text = " ".join(body + _closing(rng, user, slots))
    description = (f"{rng.choice(V.BRANDS)} {slots['product']} made of {slots['material']}, with an "
                   f"adjustable {slots['feature']} and a {rng.randint(1, 3)}-year warranty.")
    adj = rng.choice(user.adjectives)
    summary = (f"{_cap(adj)} {slots['product']}" if rating >= 4 else
               f"Not {adj} at all" if rating <= 2 else f"Decent {slots['product']}")
    query = (f'Generate the review text written by a reviewer who has given an overall rating of '
             f'"{rating:.1f}" for a product with description "{description}". '
             f'The summary of the review text is "{summary}".')
    return {"overall": rating, "summary": summary, "description": description, "reviewText": text}, query


def _abstract(rng: random.Random, user: UserStyle, year: int) -> tuple[dict[str, Any], str]:
    field_name = _topic(rng, user, V.RESEARCH_FIELDS)
    fld = V.RESEARCH_FIELDS[field_name]
    method, method2 = rng.sample(fld["methods"], 2)
    concept, concept2 = rng.sample(fld["concepts"], 2)
    problem = rng.choice(fld["problems"])
    slots = dict(_common_slots(rng, user), field=field_name, method=method, method2=method2,
                 concept=concept, concept2=concept2, problem=problem, Problem=_cap(problem),
                 dataset=rng.choice(fld["datasets"]), metric=rng.choice(fld["metrics"]),
                 verb=user.verb[0], verbs=user.verb[1])
    adj = rng.choice(user.adjectives)
    title = rng.choice((f"{_cap(method)} for {problem}", f"Towards {adj} {problem} with {method}",
                        f"{_cap(adj)} {method}: revisiting {problem}"))
    opener = user.opener.format(adj=adj, **slots)
    text = " ".join([opener] + _sentences(rng, user, V.ABSTRACT_BODY, slots) + _closing(rng, user, slots))
    keywords = [_cap(k) for k in (problem, method, concept, concept2, slots["metric"])]
    if user.numbered_keywords:
        listed = "\n".join(f"{n}. {k}" for n, k in enumerate(keywords, 1))
    else:
        listed = ", ".join(keywords) + "."
    query = f'Generate an abstract for the title "{title}" using the following items: {listed}'
    item = {"title": title, "abstract": text, "id": f"{rng.getrandbits(96):024x}", "year": year}
    return item, query


def _reddit(rng: random.Random, user: UserStyle) -> tuple[dict[str, Any], str]:
    topic = V.REDDIT_TOPICS[_topic(rng, user, V.REDDIT_TOPICS)]
    slots = dict(_common_slots(rng, user), thing=rng.choice(topic["things"]),
                 struggle=rng.choice(topic["struggles"]), slang=user.slang)
    title = rng.choice(topic["titles"]).format(n=rng.randint(2, 12))
    body = _sentences(rng, user, V.REDDIT_BODY, slots)
    if user.emoticon:
        body[-1] = f"{body[-1]} {user.emoticon}"
    middle = max(1, len(body) // 2)
    text = " ".join(body[:middle]) + "\n\n" + " ".join(body[middle:] + _closing(rng, user, slots))
    if user.tldr:
        text += f"\n\nTL;DR: {slots['thing']} helps with {slots['struggle']}."
    if user.lowercase:
        text = text.lower()
    item = {"summary": title, "content": text.strip(),
            "id": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6)),
            "author": user.user_id}
    return item, f'Generate the content for a reddit post "{title}".'


# The item field that holds the user's text, i.e. the record's `output`.
_TEXT_FIELD = {"product_review": "reviewText", "abstract_generation": "abstract", "topic_writing": "content"}


def user_records(task: str, user: UserStyle, n_records: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n_records` raw LongLaMP records of `user`, oldest first.

    The user writes HISTORY_DOCS + n_records documents in time order; record j's output is document
    HISTORY_DOCS + j and its profile 4-8 of the first HISTORY_DOCS documents, in time order.
    """
    rng = _rng(seed, task, "docs", user.user_id)
    spec = get_spec(task)
    docs = []
    for d in range(HISTORY_DOCS + n_records):
        if task == "product_review":
            docs.append(_review(rng, user))
        elif task == "abstract_generation":
            docs.append(_abstract(rng, user, year=2008 + d))
        else:
            docs.append(_reddit(rng, user))
    records = []
    for j in range(n_records):
        item, query = docs[HISTORY_DOCS + j]
        size = rng.randint(*PROFILE_SIZE)
        profile = [docs[i][0] for i in sorted(rng.sample(range(HISTORY_DOCS), size))]
        records.append({"input": query, "output": item[_TEXT_FIELD[task]], "profile": profile,
                        spec.user_key: user.user_id})
    return records


def generate_task(task: str, users: int = 24, seed: int = 0, records_per_user: int = 4,
                  setting: str = "user", preset: str = "longlamp") -> dict[str, list[dict[str, Any]]]:
    """Records of `task` per split (see the module docstring for the two settings)."""
    styles = make_users(task, users, seed, preset)
    if setting == "user":
        if users < 3:
            raise ValueError(f"the user setting needs >= 3 users (one per split), got {users}")
        n_held = max(1, round(users / 6))
        groups = {"train": styles[:users - 2 * n_held], "val": styles[users - 2 * n_held:users - n_held],
                  "test": styles[users - n_held:]}
        return {split: [r for u in group for r in user_records(task, u, records_per_user, seed)]
                for split, group in groups.items()}
    if setting == "temporal":
        if records_per_user < 3:
            raise ValueError(f"the temporal setting needs >= 3 records per user, got {records_per_user}")
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for user in styles:
            records = user_records(task, user, records_per_user, seed)
            out["train"] += records[:-2]
            out["val"].append(records[-2])
            out["test"].append(records[-1])
        return out
    raise ValueError(f"unknown setting {setting!r}; expected user or temporal")


def write_synthetic(out_dir: str | os.PathLike, users: int = 24, seed: int = 0,
                    records_per_user: int = 4, setting: str = "user",
                    tasks: Sequence[str] = TASKS, preset: str = "longlamp") -> dict[str, dict[str, int]]:
    """Write `out_dir/<task>/{train,val,test}.jsonl`; returns the record counts per task and split.

    Each task folder is replaced as a whole, once all its splits are written: never a mix of runs,
    and no stale file (say a `validation.jsonl`) left beside the new ones.
    """
    counts: dict[str, dict[str, int]] = {}
    for task in tasks:
        records_by_split = generate_task(task, users, seed, records_per_user, setting, preset)
        with atomic_directory(Path(out_dir) / task) as folder:
            for split, records in records_by_split.items():
                write_text_atomic(folder / f"{split}.jsonl", _jsonl(records))
        counts[task] = {split: len(records) for split, records in records_by_split.items()}
    return counts


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z0-9']+", text.lower()))


def _overlap_f1(a: Counter, b: Counter) -> float:
    common = sum((a & b).values())
    return 0.0 if not common else 2 * common / (sum(a.values()) + sum(b.values()))


def history_signal(task: str, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How much of a record's output its own user's history predicts: the mean unigram F1 (ROUGE-1-like,
    0-100) of each output against its own profile texts (`own`) and against the profile of the next
    record by another user (`other`). own > other means the history carries words the response needs
    that the query does not."""
    field, spec = _TEXT_FIELD[task], get_spec(task)
    own, other = [], []
    for i, record in enumerate(records):
        j = next((k % len(records) for k in range(i + 1, i + len(records))
                  if records[k % len(records)][spec.user_key] != record[spec.user_key]), None)
        if j is None:
            continue
        out = _words(record["output"])
        own.append(_overlap_f1(out, _words(" ".join(it[field] for it in record["profile"]))))
        other.append(_overlap_f1(out, _words(" ".join(it[field] for it in records[j]["profile"]))))
    n = max(len(own), 1)
    return {"own": 100 * sum(own) / n, "other": 100 * sum(other) / n, "n": len(own)}


def _jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def iter_texts(users: int = 24, seed: int = 0, records_per_user: int = 4, setting: str = "user",
               tasks: Sequence[str] = TASKS, preset: str = "longlamp") -> Iterator[str]:
    """Every text the prepared synthetic data contains: queries, outputs, profile fields, the
    rendered history items and the prompt scaffolding (system prompt, bridges), for training the
    tiny tokenizer on exactly what it will see."""
    yield DEFAULT_SYSTEM_PROMPT
    for task in tasks:
        spec = get_spec(task)
        yield spec.bridge
        for records in generate_task(task, users, seed, records_per_user, setting, preset).values():
            for record in records:
                yield record["input"]
                yield record["output"]
                for item in record["profile"]:
                    yield spec.render(item)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point of `python -m data_prep.synthetic`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="writes OUT/<task>/{train,val,test}.jsonl")
    parser.add_argument("--users", type=int, default=24, help="users per task (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records-per-user", type=int, default=4)
    parser.add_argument("--setting", choices=("user", "temporal"), default="user")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of tasks")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="longlamp",
                        help="longlamp: LongLaMP-like lengths (default); demo: short reviews whose user "
                             "traits (opener, signature closer) are always present (make demo)")
    parser.add_argument("--texts-out", default=None,
                        help="also write every text as JSONL lines {\"input\": text} (the format "
                             "`python -m flythinker_worker.tiny --build-tokenizer` reads)")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        for task in tasks:
            get_spec(task)
        counts = write_synthetic(args.out, args.users, args.seed, args.records_per_user, args.setting, tasks,
                                 args.preset)
        if args.texts_out:
            Path(args.texts_out).parent.mkdir(parents=True, exist_ok=True)
            texts = iter_texts(args.users, args.seed, args.records_per_user, args.setting, tasks, args.preset)
            write_text_atomic(args.texts_out, _jsonl({"input": text} for text in texts))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    for task, per_split in counts.items():
        print(f"{task}: " + ", ".join(f"{s} {n}" for s, n in per_split.items()) + f" -> {Path(args.out) / task}")
        with open(Path(args.out) / task / "test.jsonl", encoding="utf-8") as f:
            signal = history_signal(task, [json.loads(line) for line in f])
        print(f"{task}: history signal (test): outputs share {signal['own']:.1f} unigram F1 with their own "
              f"user's history vs {signal['other']:.1f} with another user's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
