"""The three LongLaMP tasks: record schema, validation, and LongLaMP's per-task history rendering.

Raw record (one per line of a split): `input` (the query instruction), `output` (the user's text),
`profile` (the user's past items) and a task-specific user id key. Rendering, the BM25 corpus text
and the BM25 query follow LongLaMP's own prompt code (create_*_prompt / *_query_corpus_maker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TASKS = ("product_review", "abstract_generation", "topic_writing")

# Stats keys for skipped records. Field-specific ones are "<reason>:<field>".
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_INPUT = "empty_input"
EMPTY_OUTPUT = "empty_output"
EMPTY_PROFILE = "empty_profile"
BAD_PROFILE_ITEM = "bad_profile_item"
NOT_AN_OBJECT = "not_an_object"
INVALID_JSON = "invalid_json"

_NUMBER = (int, float)


@dataclass(frozen=True)
class Problem:
    """Why a raw record cannot be used: a stats key, the offending field, and a human detail."""

    reason: str
    field: str
    detail: str


@dataclass(frozen=True)
class Record:
    """A validated LongLaMP record."""

    query: str
    output: str
    profile: list[dict[str, Any]]
    user_id: str


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific: schema keys, item rendering, BM25 texts, prompt wording."""

    name: str
    user_key: str
    # Profile item keys that rendering and BM25 read, with the types accepted for each.
    item_fields: dict[str, tuple[type, ...]]
    render: Callable[[dict[str, Any]], str]
    corpus_text: Callable[[dict[str, Any]], str]
    bm25_query: Callable[[str], str]
    # LongLaMP's sentence between the history and the query.
    bridge: str
    # Profile key ordering items in time, when the task has one.
    recency_key: str | None = None


def _fmt(value: Any) -> str:
    return str(value)


def _render_review(item: dict[str, Any]) -> str:
    return (f'"{_fmt(item["overall"])}" is a rating for the product with description '
            f'"{item["description"]}". "{item["summary"]}" is summary for "{item["reviewText"]}"')


def _render_abstract(item: dict[str, Any]) -> str:
    return f'"{item["abstract"]}" is the abstract for the title "{item["title"]}"'


def _render_topic(item: dict[str, Any]) -> str:
    return f'"{item["summary"]}" is a summary for "{item["content"]}"'


def _after_items(query: str) -> str:
    # LongLaMP's abstract query is the keyword list after "items:"; the whole input when absent.
    index = query.find("items:")
    return query[index + len("items:"):].strip() if index >= 0 else query


SPECS: dict[str, TaskSpec] = {
    "product_review": TaskSpec(
        name="product_review", user_key="reviewerId",
        item_fields={"overall": (int, float, str), "summary": (str,), "description": (str,),
                     "reviewText": (str,)},
        render=_render_review,
        corpus_text=lambda x: f'{_fmt(x["overall"])} {x["summary"]} {x["description"]} {x["reviewText"]}',
        bm25_query=lambda q: q,
        bridge="Following the given patterns, "),
    "abstract_generation": TaskSpec(
        name="abstract_generation", user_key="name",
        item_fields={"title": (str,), "abstract": (str,)},
        render=_render_abstract,
        corpus_text=lambda x: f'{x["title"]} {x["abstract"]}',
        bm25_query=_after_items,
        bridge=("Use the above abstracts as context to understand the style and language of the "
                "user and, "),
        recency_key="year"),
    "topic_writing": TaskSpec(
        name="topic_writing", user_key="author",
        item_fields={"summary": (str,), "content": (str,)},
        render=_render_topic,
        corpus_text=lambda x: f'{x["summary"]} {x["content"]}',
        bm25_query=lambda q: q,
        bridge="Following the given patterns, "),
}


def get_spec(task: str) -> TaskSpec:
    """The spec of `task`; a clear error for an unknown name."""
    if task not in SPECS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return SPECS[task]


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int subclass; a True rating or title is a mistyped field, not a number.
    return isinstance(value, types) and not isinstance(value, bool)


def _check_item(index: int, item: Any, spec: TaskSpec) -> Problem | None:
    if not isinstance(item, dict):
        return Problem(BAD_PROFILE_ITEM, f"profile[{index}]",
                       f"profile item is {type(item).__name__}, expected an object")
    for key, types in spec.item_fields.items():
        if key not in item or item[key] is None:
            return Problem(BAD_PROFILE_ITEM, f"profile[{index}].{key}", "missing")
        if not _type_ok(item[key], types):
            return Problem(BAD_PROFILE_ITEM, f"profile[{index}].{key}",
                           f"is {type(item[key]).__name__}, expected "
                           + "/".join(t.__name__ for t in types))
    return None


def validate(raw: Any, spec: TaskSpec, need_history: bool) -> Record | Problem:
    """Check one raw record against the task schema.

    Profile items are checked only when history is asked for (`need_history`): the non-personalized
    baseline must not lose records to profile defects it never reads. `profile` itself must still be
    a list, since that is the schema.
    """
    if not isinstance(raw, dict):
        return Problem(NOT_AN_OBJECT, "", f"record is {type(raw).__name__}, expected an object")
    fields: dict[str, tuple[type, ...]] = {"input": (str,), "output": (str,), "profile": (list,),
                                           spec.user_key: (str, int)}
    for key, types in fields.items():
        if key not in raw or raw[key] is None:
            return Problem(f"{MISSING_FIELD}:{key}", key, "missing")
        if not _type_ok(raw[key], types):
            return Problem(f"{WRONG_TYPE}:{key}", key, f"is {type(raw[key]).__name__}, expected "
                           + "/".join(t.__name__ for t in types))
    user_id = str(raw[spec.user_key]).strip()
    if not user_id:
        return Problem(f"{MISSING_FIELD}:{spec.user_key}", spec.user_key, "empty user id")
    if not raw["input"].strip():
        return Problem(EMPTY_INPUT, "input", "empty query")
    if not raw["output"].strip():
        return Problem(EMPTY_OUTPUT, "output", "empty output")
    profile = raw["profile"]
    if need_history:
        if not profile:
            return Problem(EMPTY_PROFILE, "profile", "empty profile but history was asked for")
        for index, item in enumerate(profile):
            problem = _check_item(index, item, spec)
            if problem is not None:
                return problem
    return Record(query=raw["input"], output=raw["output"], profile=profile, user_id=user_id)
