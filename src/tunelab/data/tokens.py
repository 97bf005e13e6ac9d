"""Token lengths as training will see them: the chat template applied, the system prompt added."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunelab.chat import render_conversation, with_system_prompt
from tunelab.data.records import Record
from tunelab.template_checks import template_refusal


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


def most_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for: its longest vocabulary entry, added tokens included
    (a byte-level entry holds one character per byte, a SentencePiece entry one per character, a byte-fallback
    entry such as <0x0A> more than the one byte it decodes to)."""
    return max(1, max((len(token) for token in tokenizer.get_vocab()), default=1))


def token_counter(tokenizer: Any, system_prompt: str | None,
                  longest: int | None = None) -> Callable[[list[Record]], list[int]]:
    """A function giving each record's length in tokens (the longer answer, for preference pairs).

    With `longest`, a text whose length in characters proves it longer than `longest` tokens is not tokenized (a
    hostile megabyte row took a minute and gigabytes of memory in the tokenizer, only to be dropped): its length is
    given as a lower bound above `longest`, which is all a filter needs."""
    # Twice the bound: a tokenizer's normalizer may shorten a text before splitting it (accents composed).
    cutoff = None if longest is None else 2 * (longest + 1) * most_chars_per_token(tokenizer)

    def count(records: list[Record]) -> list[int]:
        groups = [_texts(r, tokenizer, system_prompt) for r in records]
        flat = [t for group in groups for t in group]
        short = [t for t in flat if cutoff is None or len(t) <= cutoff]
        # One batched call: the Rust tokenizer is far faster on a list than text by text.
        counted = iter(len(ids) for ids in tokenizer(short, add_special_tokens=False)["input_ids"]) if short else None
        lengths = iter(next(counted) if cutoff is None or len(t) <= cutoff else longest + 1 for t in flat)
        return [max(next(lengths) for _ in group) for group in groups]

    return count
