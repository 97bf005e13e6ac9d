"""Row formats -> Records.

Each parser takes one decoded row and returns the normalized parts, or raises `RowError` naming the
offending field; the loader adds the file and line. Auto-detection looks at the row's keys.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.records import Message, Record, join_text_parts
from tunelab.errors import NonTextPart, RowError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "text")


def detect_format(row: dict[str, Any]) -> str:
    keys = set(row)
    checks = [
        ("messages", {"messages"}), ("sharegpt", {"conversations"}), ("preference", {"chosen", "rejected"}),
        ("kto", {"completion", "label"}), ("prompt_completion", {"prompt", "completion"}),
        ("alpaca", {"instruction", "output"}), ("text", {"text"}),
    ]
    for name, needed in checks:
        if needed <= keys:
            return name
    # The format this row is closest to: the one sharing most keys with it (the first on ties).
    name, needed = max(checks, key=lambda check: len(check[1] & keys))
    near = f": as {name} it lacks {', '.join(sorted(needed - keys))}" if needed & keys else ""
    raise RowError("(row)", f"cannot tell the format from its keys ({', '.join(sorted(keys)) or 'none'}){near}; "
                   "set data.format or map columns with `columns:`")


def _text(row: dict[str, Any], name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None and not required:
        return ""
    if value is None:
        raise RowError(name, "is missing")
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(name, "is empty")
    return value


def _messages(value: Any, where: str, roles: dict[str, str] | None = None, role_key: str = "role",
              content_key: str = "content") -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(where, f"expected a non-empty list of {{{role_key}, {content_key}}} objects")
    out = []
    for i, m in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise RowError(here, f"expected an object with {role_key} and {content_key}, got {type(m).__name__}")
        raw_role, content = m.get(role_key), m.get(content_key)
        if m.get("tool_calls") or m.get("function_call") or raw_role in TOOL_ROLES:
            raise RowError(here, "a tool call or tool result; tunelab trains on text turns (system, user, "
                                 "assistant): leave tool rows out, or write the calls into the text")
        if isinstance(content, list):
            content = _text_parts(content, f"{here}.{content_key}")
        role = (roles or {r: r for r in ROLES}).get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            expected = ", ".join(roles or ROLES)
            raise RowError(f"{here}.{role_key}", f"unknown role {raw_role!r}; expected one of {expected}")
        if content_key not in m:
            raise RowError(f"{here}.{content_key}", "is missing")
        if not isinstance(content, str):
            raise RowError(f"{here}.{content_key}", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"{here}.{content_key}", "is empty")
        if role == "system" and i != 0:
            raise RowError(f"{here}.{role_key}", "a system message may only come first")
        message: Message = {"role": role, "content": content}
        if "weight" in m:
            message.update(_weight(m["weight"], role, f"{here}.weight"))
        out.append(message)
    return out


def _text_parts(parts: list[Any], where: str) -> str:
    try:
        return join_text_parts(parts)
    except NonTextPart as part:
        raise RowError(f"{where}[{part.index}]",
                       f"{part.shown}; tunelab trains text models: only {{type: text, text}} parts") from None


def _weight(value: Any, role: str, where: str) -> dict[str, int]:
    """OpenAI's per-message weight: 0 keeps an assistant turn out of the loss (it stays in the context)."""
    if role != "assistant":
        raise RowError(where, "only assistant messages take a weight")
    if isinstance(value, bool) or value not in (0, 1):
        raise RowError(where, f"expected 0 (not trained on) or 1, got {value!r}")
    return {"weight": 0} if value == 0 else {}


def _conversation(messages: list[Message], where: str) -> list[Message]:
    """A training conversation: has a user turn and ends with the assistant's answer."""
    if not any(m["role"] == "user" for m in messages):
        raise RowError(where, "has no user message")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"{where}[{len(messages) - 1}].role", "the last message must be the assistant's answer")
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise RowError(where, "every assistant message has weight 0: nothing to train on")
    return messages


def _prompt(value: Any, where: str) -> list[Message]:
    """A prompt given as a string or a message list ending with a user turn."""
    _string_or_messages(value, where)
    if isinstance(value, str):
        if not value.strip():
            raise RowError(where, "is empty")
        return [{"role": "user", "content": value}]
    messages = _messages(value, where)
    if messages[-1]["role"] != "user":
        raise RowError(f"{where}[{len(messages) - 1}].role", "a prompt must end with a user message")
    return messages


def _string_or_messages(value: Any, where: str) -> None:
    if value is None:
        raise RowError(where, "is missing")
    if not isinstance(value, (str, list)):
        raise RowError(where, f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def _answer(value: Any, where: str, prompt: list[Message]) -> str:
    """An answer given as a string, a one-message list, or a whole conversation that repeats the prompt."""
    _string_or_messages(value, where)
    if isinstance(value, str):
        if not value.strip():
            raise RowError(where, "is empty")
        return value
    messages = _messages(value, where)
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(where, "expected one assistant answer (a string or [{role: assistant, content}])")
    return messages[0]["content"]


def parse_row(row: dict[str, Any], fmt: str, record_id: str, source: str) -> Record:
    """Parse one row in `fmt` ('auto' detects it) into a Record."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        return Record(record_id, source, "chat", _conversation(_messages(row.get("messages"), "messages"), "messages"))
    if fmt == "sharegpt":
        turns = _messages(row.get("conversations"), "conversations", SHAREGPT_ROLES, "from", "value")
        return Record(record_id, source, "chat", _conversation(turns, "conversations"))
    if fmt == "alpaca":
        instruction, extra, output = _text(row, "instruction"), _text(row, "input", False), _text(row, "output")
        prompt = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return Record(record_id, source, "chat", [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": output}])
    if fmt == "prompt_completion":
        prompt = _prompt(row.get("prompt"), "prompt")
        answer = _answer(row.get("completion"), "completion", prompt)
        return Record(record_id, source, "chat", [*prompt, {"role": "assistant", "content": answer}])
    if fmt == "preference":
        return _parse_preference(row, record_id, source)
    if fmt == "kto":
        prompt = _prompt(row.get("prompt"), "prompt")
        completion = _answer(row.get("completion"), "completion", prompt)
        return Record(record_id, source, "kto", prompt, completion=completion, label=_bool(row.get("label"), "label"))
    if fmt == "text":
        return Record(record_id, source, "text", text=_text(row, "text"))
    raise RowError("(row)", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _parse_preference(row: dict[str, Any], record_id: str, source: str) -> Record:
    chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
    if row.get("prompt") is not None:
        prompt = _prompt(row.get("prompt"), "prompt")
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        # Conversations that share their prompt (Anthropic HH style): the prompt is the common prefix.
        chosen_msgs, rejected_msgs = _messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected")
        n = 0
        while n < min(len(chosen_msgs), len(rejected_msgs)) - 1 and chosen_msgs[n] == rejected_msgs[n]:
            n += 1
        prompt = chosen_msgs[:n]
        if not prompt or prompt[-1]["role"] != "user":
            raise RowError("prompt", "is missing, and chosen/rejected share no prompt ending with a user turn")
    else:
        raise RowError("prompt", "is missing")
    chosen, rejected = _answer(chosen_raw, "chosen", prompt), _answer(rejected_raw, "rejected", prompt)
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "is identical to 'chosen'; a preference pair needs two different answers")
    return Record(record_id, source, "preference", prompt, chosen=chosen, rejected=rejected)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in {"true", "1", "yes", "false", "0", "no"}:
        return str(value).strip().lower() in {"true", "1", "yes"}
    raise RowError(where, f"expected true or false, got {value!r}")
