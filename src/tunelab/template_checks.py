"""Checks that a chat template can be trained on as it will be served, run before any weights load.

Training masks the loss from character spans of the rendered conversation (tunelab.chat.assistant_spans), and
every way a template can defeat that is found here, where the user can still act on it: when the template is
set up (a template whose generation prompt is not how it opens a finished answer, DeepSeek-R1-Distill's
`<think>\\n`), and per row in data prep and eval suites (a row whose system message the template leaves out,
Mistral v0.3's and Phi-3's; an earlier answer the template rewrites, Qwen3's reasoning). Before, data prep said
"all rows valid" and training stopped at the first such row with a message naming no row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.chat import assistant_spans, leaves_out_system, render_conversation, render_prompt, token_ids
from tunelab.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

_PROBE = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]


def check_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """A template that does not compile, cannot render one user question and its answer, or whose generation
    prompt is not how a finished conversation continues: one line, before anything is trained."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        render_conversation(tokenizer, _PROBE)
    except TemplateSyntaxError as err:
        line = f"line {err.lineno}: " if err.lineno else ""
        raise ModelError(f"{where}: {line}template syntax error: {err.message}") from None
    except TemplateError as err:
        raise ModelError(f"{where}: cannot render a user question and its answer: {err}") from None
    try:
        assistant_spans(tokenizer, _PROBE)
    except ModelError as err:
        raise ModelError(f"{where}: {err}; set data.chat_template to a .jinja file whose generation prompt is "
                         "the text before a finished answer") from None


def check_prompt_tokens(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """The generation prompt must tokenize as the start of the conversation it opens. One that ends in a space
    ("Assistant: ") does not: the answer's first token takes that space ("Ġitem"), so training labels the answer
    from its second token on and inference feeds a lone space token the model never saw before an answer."""
    # "the": the merge every byte-level BPE vocabulary has first ("Ġthe"; "Ġt" in a tiny one).
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "the answer."}]
    prompt = render_prompt(tokenizer, messages[:1])
    prompt_ids = token_ids(tokenizer, prompt)
    if token_ids(tokenizer, render_conversation(tokenizer, messages))[: len(prompt_ids)] != prompt_ids:
        raise ModelError(f"{where}: its generation prompt ends inside the answer's first token (it ends with "
                         f"{prompt[-12:]!r}): training and inference would split it differently; end the "
                         "generation prompt without trailing whitespace")


def template_refusal(tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]]) -> str | None:
    """Why the chat template cannot train on one of `conversations` as it renders them, or None: it refuses
    to render it (a template's own `raise_exception`: roles that must alternate, no system role), it leaves out
    the system message, or the loss cannot be masked (an answer rewritten, a prompt that is not a prefix).
    Named per row by data prep and eval suites."""
    from jinja2 import TemplateError

    for messages in conversations:
        try:
            full = render_conversation(tokenizer, messages)
        except TemplateError as err:
            if messages and messages[0]["role"] == "system" and template_refusal(tokenizer, [messages[1:]]) is None:
                return (f"the model's chat template takes no system message ({err}); put the system text into the "
                        "first user turn")
            return f"the model's chat template refuses this conversation: {err}"
        if leaves_out_system(messages, full):
            return ("the model's chat template leaves the system message out of a conversation that ends in an "
                    "answer, so it would be trained without it; put the system text into the first user turn")
        if any(m["role"] == "assistant" for m in messages):
            try:
                assistant_spans(tokenizer, messages)
            except ModelError as err:
                return f"cannot mask the loss of this conversation: {err}"
    return None
