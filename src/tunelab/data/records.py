"""The normalized example every loader produces and every later stage reads.

Four kinds, by what the row teaches:
- chat:       `messages`, a conversation ending in the assistant's answer (SFT);
- preference: `messages` is the prompt, `chosen` / `rejected` the two answers (DPO, ORPO, SimPO, reward);
- kto:        `messages` is the prompt, `completion` an answer and `label` whether it is desirable;
- text:       `text`, raw text for continued pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import NonTextPart

Message = dict[str, Any]  # role and content; "weight": 0 on an assistant turn kept out of the loss


def join_text_parts(parts: list[Any]) -> str:
    """OpenAI's content parts, [{type: text, text}, ...]: their texts, one per line.

    Training rows and served requests both come through here, so a prompt sent as parts is the very text
    the model was trained on.
    """
    texts = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and not isinstance(part.get("text"), str):
            raise NonTextPart(k, f"a text part whose text is {type(part.get('text')).__name__}, not a string")
        if kind != "text":
            raise NonTextPart(k, f"a {kind} part" if isinstance(kind, str) else f"a {type(part).__name__}")
        texts.append(part["text"])
    return "\n".join(texts)


@dataclass
class Record:
    id: str
    source: str
    kind: str = "chat"
    messages: list[Message] = field(default_factory=list)
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_text(self) -> str:
        """Everything the model is given: user (and system) turns, or the raw text."""
        if self.kind == "text":
            return self.text or ""
        turns = self.messages if self.kind != "chat" else self.messages[:-1]
        return "\n".join(m["content"] for m in turns)

    def answer_text(self) -> str:
        """What the model is taught to produce."""
        if self.kind == "chat":
            return self.messages[-1]["content"]
        if self.kind == "preference":
            return f"{self.chosen}\n{self.rejected}"
        if self.kind == "kto":
            return self.completion or ""
        return ""

    def all_text(self) -> str:
        return f"{self.prompt_text()}\n{self.answer_text()}".strip()

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "source": self.source, "kind": self.kind}
        if self.kind == "text":
            row["text"] = self.text
        elif self.kind == "chat":
            row["messages"] = self.messages
        else:
            row["prompt"] = self.messages
            if self.kind == "preference":
                row.update(chosen=self.chosen, rejected=self.rejected)
            else:
                row.update(completion=self.completion, label=self.label)
        if self.meta:
            row["meta"] = self.meta
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Record:
        kind = row.get("kind", "chat")
        messages = row.get("messages") if kind == "chat" else row.get("prompt")
        return cls(
            id=row["id"], source=row.get("source", ""), kind=kind, messages=messages or [],
            chosen=row.get("chosen"), rejected=row.get("rejected"), completion=row.get("completion"),
            label=row.get("label"), text=row.get("text"), meta=row.get("meta") or {},
        )
