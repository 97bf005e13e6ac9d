"""Token lengths as training will see them: the chat template applied, the system prompt added."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunelab.chat import render_conversation, template_refusal, with_system_prompt
from tunelab.data.records import Record


def _texts(record: Record, tokenizer: Any, system_prompt: str | None) -> list[str]:
    if record.kind == "text":
        return [record.text or ""]
    return [render_conversation(tokenizer, c) for c in _conversations(record, system_prompt)]


def _conversations(record: Record, system_prompt: str | None) -> list[list[dict[str, str]]]:
    if record.kind == "text":
        return []
    prompt = with_system_prompt(record.messages, system_prompt)
    if record.kind == "chat":
        return [prompt]
    answers = [record.chosen, record.rejected] if record.kind == "preference" else [record.completion]
    return [[*prompt, {"role": "assistant", "content": a or ""}] for a in answers]


def refused_by_template(record: Record, tokenizer: Any, system_prompt: str | None) -> str | None:
    """Why the chat template will not render this row as training renders it, or None."""
    return template_refusal(tokenizer, _conversations(record, system_prompt))


def token_counter(tokenizer: Any, system_prompt: str | None) -> Callable[[list[Record]], list[int]]:
    """A function giving each record's length in tokens (the longer answer, for preference pairs)."""

    def count(records: list[Record]) -> list[int]:
        groups = [_texts(r, tokenizer, system_prompt) for r in records]
        flat = [t for group in groups for t in group]
        if not flat:
            return []
        # One batched call: the Rust tokenizer is far faster on a list than text by text.
        lengths = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])
        return [max(next(lengths) for _ in group) for group in groups]

    return count
