"""Turn one validated LongLaMP record into one output row: history, budgets, chat messages.

User turn = the retrieved history items (LongLaMP's per-task rendering, one item per line), a blank
line, LongLaMP's bridge sentence and the query; with no history, just the query. The assistant turn
is the user's text cut to its budget; `reference` keeps the untruncated output for scoring.

System turn: none by default, so the generator's own chat template supplies its default (Qwen2.5's
"You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", the tiny tokenizer's "You are a
helpful assistant.") exactly as the paper's prompts had it; `system_prompt="..."` writes an explicit one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_prep.retrieval import select_history
from data_prep.tasks import Record, TaskSpec
from data_prep.text import HFTokenCounter, Truncated, split_sentences, truncate, truncate_pieces
from flythinker_worker.tiny import DEFAULT_SYSTEM_PROMPT  # noqa: F401 - the tiny template's default, re-exported


@dataclass(frozen=True)
class Budgets:
    """Token budgets (inclusive maxima of the text alone); the paper's are 1250/300/1000."""

    history: int = 1250
    query: int = 300
    response: int = 1000

    def __post_init__(self) -> None:
        for name in ("history", "query", "response"):
            if getattr(self, name) < 1:
                raise ValueError(f"token budget for {name} must be >= 1, got {getattr(self, name)}")


def history_pieces(items: list[dict[str, Any]], spec: TaskSpec) -> list[str]:
    """Sentence pieces of the rendered items joined by newlines; an item end is always a boundary,
    so the history budget drops whole trailing items before it cuts inside one."""
    pieces: list[str] = []
    for number, item in enumerate(items):
        item_pieces = split_sentences(spec.render(item)) or [""]
        if number < len(items) - 1:
            item_pieces[-1] = item_pieces[-1].rstrip() + "\n"
        pieces.extend(item_pieces)
    return pieces


def user_turn(history: str, query: str, spec: TaskSpec) -> str:
    """The user message: history, blank line, bridge + query; the bare query without history."""
    return f"{history}\n\n{spec.bridge}{query}" if history else query


@dataclass
class RowBuilder:
    """Builds rows for one task with one tokenizer, retriever and set of budgets."""

    spec: TaskSpec
    tokenizer: Any
    history_k: int = 2
    retriever: str = "bm25"
    budgets: Budgets = Budgets()
    system_prompt: str | None = None  # None: no system turn (the chat template's own default applies)

    def __post_init__(self) -> None:
        self.counter = HFTokenCounter(self.tokenizer)

    def _n_template_tokens(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return len(ids)

    def build(self, record: Record, split: str, index: int) -> tuple[dict[str, Any], dict[str, bool]]:
        """The output row for `record` (row `index` of `split`) and which parts were truncated."""
        items = select_history(record.profile, record.query, self.spec, self.history_k, self.retriever)
        history = (truncate_pieces(history_pieces(items, self.spec), self.budgets.history, self.counter)
                   if items else Truncated("", 0, False))
        query = truncate(record.query, self.budgets.query, self.counter)
        response = truncate(record.output, self.budgets.response, self.counter)
        prompt = [{"role": "user", "content": user_turn(history.text, query.text, self.spec)}]
        if self.system_prompt is not None:
            prompt.insert(0, {"role": "system", "content": self.system_prompt})
        row = {
            "id": f"{self.spec.name}-{split}-{index}",
            "task": self.spec.name,
            "user_id": record.user_id,
            "messages": prompt + [{"role": "assistant", "content": response.text}],
            "prompt": prompt,
            "response": response.text,
            "reference": record.output,
            # The whole chat-templated prompt incl. the (template's or explicit) system turn and
            # the generation prompt.
            "n_prompt_tokens": self._n_template_tokens(prompt),
            "n_response_tokens": response.n_tokens,
            "n_history_tokens": history.n_tokens,
            "n_query_tokens": query.n_tokens,
            # Items retrieved; the history budget may drop trailing ones from the text.
            "n_history_items": len(items),
        }
        return row, {"history": history.cut, "query": query.cut, "response": response.cut}
