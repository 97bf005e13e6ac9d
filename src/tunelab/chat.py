"""Chat rendering and assistant-only loss masks, shared by train, eval and serve.

One function renders a prompt (`render_prompt`), and training builds its token sequence from that very
function, so the prompt a model was trained on is, by construction, the prompt eval and serving send it.
Loss masks are computed here from character spans rather than from `{% generation %}` blocks, which most
templates (SmolLM2's among them) do not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import ModelError
from tunelab.progress import console

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.data.load import Record

Message = dict[str, str]

IGNORE_INDEX = -100

# Used only when a model ships without a template (base models): ChatML, the most common convention.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not tokenizer.chat_template:
        console.print("[yellow]warning:[/] the model has no chat template; using ChatML for train, eval and serve")
        tokenizer.chat_template = CHATML_TEMPLATE


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Prepend `system_prompt` unless the conversation already has a system message."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The text a model sees before it answers `messages`: the template plus its generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return the text plus the [start, end) character span of each assistant answer.

    A span covers the answer and the template's end-of-turn marker (so the model learns to stop), but not
    the whitespace the template prints after it. Raises if the template is not prefix-stable, because then
    the prompt used in training would differ from the one used at inference.
    """
    full = render_conversation(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i])
        through_answer = render_conversation(tokenizer, messages[: i + 1])
        if not (full.startswith(through_answer) and through_answer.startswith(prompt)):
            raise ModelError(
                "chat template is not prefix-stable: rendering a conversation does not start with the rendering "
                f"of its first {i} messages plus the generation prompt, so train and inference prompts would differ"
            )
        answer = through_answer[len(prompt):]
        spans.append((len(prompt), len(prompt) + len(answer.rstrip())))
    return full, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> TokenizedExample:
    """Token ids of the whole conversation, with labels only on assistant tokens (IGNORE_INDEX elsewhere)."""
    text, spans = assistant_spans(tokenizer, messages)
    # The template already writes any BOS/special tokens as text: adding them again would double them.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        # A token belongs to an answer when it starts inside the answer's span.
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return TokenizedExample(ids, labels)



def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: list[Record], system_prompt: str | None, max_length: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Tokenize records for training or loss evaluation.

    Returns the encoded examples ({"id", "input_ids", "labels"}) and the ids of records dropped for
    exceeding `max_length` tokens (dropped, not truncated: truncation would cut off the answer).
    """
    encoded, too_long = [], []
    for record in records:
        ex = tokenize_conversation(tokenizer, with_system_prompt(record.messages, system_prompt))
        if len(ex.input_ids) > max_length:
            too_long.append(record.id)
            continue
        encoded.append({"id": record.id, "input_ids": ex.input_ids, "labels": ex.labels})
    return encoded, too_long
