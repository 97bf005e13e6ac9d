"""The request bodies of the OpenAI-compatible API, validated by pydantic before any work is done on them.

OpenAI clients send more fields than tunelab uses. Fields no answer depends on (metadata, store, service_tier,
parallel_tool_calls...) are ignored; those that would change an answer and that tunelab does not implement are
declared here and refused unless left at their defaults (`Sampling.unsupported`), so a client never gets an
answer that silently ignored what it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.data.records import join_text_parts
from tunelab.errors import NonTextPart


class TextBody(BaseModel):
    """A body whose strings are all text: JSON's \\ud800-\\udfff escapes parse into lone surrogates, which no
    tokenizer or log line can encode (each was a 500 deep inside the request)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        stack = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                stack += item
            elif isinstance(item, str) and not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff), which is not "
                                     "text") from None
        return data


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI's content parts: their texts, one per line, exactly as training joins them."""
        if not isinstance(value, list):
            return value
        try:
            return join_text_parts(value)
        except NonTextPart as part:
            raise ValueError(f"{part}; only text parts ({{type: text, text}}) are accepted: "
                             "this server serves a text model") from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(TextBody):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, gt=0, strict=True)
    max_completion_tokens: int | None = Field(None, gt=0, strict=True)
    # allow_inf_nan: JSON parsers accept NaN and Infinity. strict: "0.5" is not a number, "yes" not a boolean.
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True, description="Only one choice per request.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)  # what torch.Generator.manual_seed takes
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="End-user id: batch slots are shared fairly by it.")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: bool | int | None = None  # chat: a bool; completions: how many alternatives
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        """JSON's true is not a number (pydantic would read it as 1: `max_tokens: true` asked for one token)."""
        if isinstance(value, bool):
            raise ValueError("expects a number, got a boolean")
        return value

    def unsupported(self) -> list[str]:
        """The OpenAI parameters this request sets to something tunelab does not do."""
        asked = {
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs not in (None, False),
            "top_logprobs": self.top_logprobs not in (None, 0),
            "response_format": (self.response_format or {"type": "text"}).get("type") != "text",
            "tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
            "functions": bool(self.functions), "function_call": self.function_call not in (None, "none"),
        }
        return [name for name, is_set in asked.items() if is_set]


class ChatBody(Sampling):
    messages: list[Message] = Field(..., min_length=1)


class CompletionBody(Sampling):
    prompt: str
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + [name for name, is_set in (
            ("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", bool(self.suffix))) if is_set]


class AdapterBody(TextBody):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., max_length=64)
    path: str = Field(..., max_length=4096)
