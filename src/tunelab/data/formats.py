"""Row formats -> the normalized schema: {"id": str, "messages": [{"role", "content"}, ...]}.

Each parser takes one decoded row and either returns the normalized messages or raises `RowError`
naming the offending field; the loader adds the file and line.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A single row is invalid; `field` names where (e.g. 'messages[2].role')."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}': {problem}")


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    keys = ", ".join(sorted(row)) or "none"
    raise RowError("(row)", f"cannot tell the format from its keys ({keys}); expected 'messages' or "
                   "'instruction'/'output', or set data.format")


def parse_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"{where}.content", "is empty")
        if role == "system" and i != 0:
            raise RowError(f"{where}.role", "a system message may only come first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise RowError("messages", "has no user message")
    if out[-1]["role"] != "assistant":
        raise RowError(f"messages[{len(out) - 1}].role", "the last message must be the assistant's answer")
    return out


def parse_alpaca(row: dict[str, Any]) -> list[dict[str, str]]:
    instruction, extra, output = row.get("instruction"), row.get("input", ""), row.get("output")
    for name, value, required in (("instruction", instruction, True), ("input", extra, False),
                                  ("output", output, True)):
        if value is None and not required:
            continue
        if not isinstance(value, str):
            raise RowError(name, f"expected a string, got {type(value).__name__}")
        if required and not value.strip():
            raise RowError(name, "is empty")
    prompt = instruction if not (extra or "").strip() else f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


PARSERS = {"messages": parse_messages, "alpaca": parse_alpaca}
