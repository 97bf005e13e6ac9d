"""Chat rendering and assistant-only loss masks, shared by train, eval and serve.

One function renders a prompt (`render_prompt`), and training builds its token sequence from that very
function, so the prompt a model was trained on is, by construction, the prompt eval and serving send it.
Loss masks are computed here from character spans rather than from `{% generation %}` blocks, which most
templates (SmolLM2's among them) do not have.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ModelError
from tunelab.progress import console

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import RunConfig
    from tunelab.data.load import Record

Message = dict[str, str]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TemplateSetup:
    """Which chat template a run uses and what tunelab had to add to the vocabulary for it."""

    family: str  # a known family's name, or "custom"
    source: str  # "model" (its own), "chosen" (data.chat_template), "default" (a base model, no choice made)
    added_tokens: tuple[str, ...] = ()

    def describe(self) -> str:
        origin = {"model": "the model's own", "chosen": "data.chat_template",
                  "default": "default for a model without one; set data.chat_template to choose"}[self.source]
        added = f"; adds special tokens {', '.join(self.added_tokens)}" if self.added_tokens else ""
        return f"{self.family} ({origin}{added})"


_WARNED_NO_TEMPLATE: set[str] = set()


def setup_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str | None,
                        add_tokens: bool = True) -> TemplateSetup:
    """Give `tokenizer` the run's chat template: its own, or `data.chat_template` (a family name or a .jinja
    file). Markers the chosen template writes but the vocabulary lacks become special tokens (unless not
    `add_tokens`), so that each is one token the model can learn to emit and generation can stop on (the
    caller grows the model's embeddings: tunelab.vocab)."""
    from tunelab.families import DEFAULT_FAMILY, FAMILIES, describe, missing_markers, template_for

    from tunelab.template_checks import check_prompt_tokens, check_template

    if choice is None and tokenizer.chat_template:
        check_template(tokenizer, "the model's own chat template")
        return TemplateSetup(describe(tokenizer), "model")
    name = choice or DEFAULT_FAMILY
    if name in FAMILIES:
        tokenizer.chat_template = template_for(name, default_bos(tokenizer))
    else:
        path = Path(name).expanduser()
        if path.suffix != ".jinja" or not path.is_file():
            known = ", ".join(FAMILIES)
            raise ModelError(f"data.chat_template: '{name}' is neither a known family ({known}) nor a .jinja file")
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ModelError(f"data.chat_template: cannot read {path}: {err}") from None
        check_template(tokenizer, f"data.chat_template: {path}")
        bos = default_bos(tokenizer)  # a family's template gets it in front (template_for); a file is as written
        if bos and not render_conversation(tokenizer, [{"role": "user", "content": "Hi?"}]).startswith(bos):
            from rich.markup import escape

            console.print(f"[yellow]warning:[/] {escape(f'data.chat_template: {path}')} does not write the tokenizer's "
                          f"bos {escape(repr(bos))}, which this model had in front of every text it was pretrained on; "
                          "start the template with {{ bos_token }} unless the model is meant to go without")
    missing = missing_markers(tokenizer) if add_tokens else []
    if missing:
        from tokenizers import AddedToken

        rstrip = name in FAMILIES and FAMILIES[name].markers_rstrip
        tokens = [AddedToken(m, special=True, normalized=False, rstrip=rstrip) for m in missing]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    if name not in FAMILIES:
        check_prompt_tokens(tokenizer, f"data.chat_template: {name}")
    if choice is None and tokenizer.name_or_path not in _WARNED_NO_TEMPLATE:  # once per model, not per stage
        _WARNED_NO_TEMPLATE.add(tokenizer.name_or_path)
        console.print(f"[yellow]warning:[/] the model has no chat template; using {name} for train, eval and serve "
                      "(set data.chat_template to choose another)")
    return TemplateSetup(describe(tokenizer), "chosen" if choice else "default", tuple(missing))


def chat_tokenizer(folder: Path, choice: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a trained model, ready to chat: a run trained on raw text (cpt on a base model)
    saved none, so it chats in `data.chat_template` (default chatml) written as text: no tokens are added to an
    already trained vocabulary, and generation is cut at the end-of-turn text instead."""
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(folder)
    if not tokenizer.chat_template:
        setup_chat_template(tokenizer, choice, add_tokens=False)
    return tokenizer


def run_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    """The tokenizer a run trains with, without loading weights: the model's, with the run's chat template
    and the marker tokens it adds (continued pre-training reads raw text and needs no template)."""
    from tunelab.models import tokenizer_for

    tokenizer = tokenizer_for(cfg.model)
    if cfg.objective.type != "cpt":
        setup_chat_template(tokenizer, cfg.data.chat_template)
    return tokenizer


def without_default_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """`text` as runtimes that add the bos themselves should receive it (llama.cpp and Ollama do when the GGUF's
    add_bos_token says so, which the converter copies from the tokenizer): without a leading bos text."""
    bos = default_bos(tokenizer)
    return text[len(bos):] if bos and text.startswith(bos) else text


def default_bos(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The bos text the tokenizer puts in front of plain text by default (what the model was pretrained on)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos]:
        return tokenizer.bos_token
    return None


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Prepend `system_prompt` unless the conversation already has a system message."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str | None) -> list[int]:
    """Raw text as continued pre-training sees it: the tokenizer's own bos (if it adds one), then eos."""
    return tokenizer(text or "", add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


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
    the whitespace the template prints after it. The last answer must follow exactly the prompt that eval and
    serving render for the conversation before it (else ModelError: train and inference prompts would differ).
    Earlier answers are located in the whole rendering, not in renderings of shorter conversations: some
    templates (Mistral's) move the system text into the last user turn, so those need not be its prefixes."""
    full = render_conversation(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[tuple[int, int]] = []
    if not turns:
        return full, spans
    last = turns[-1]
    prompt = render_prompt(tokenizer, messages[:last])
    through_answer = render_conversation(tokenizer, messages[: last + 1])
    if not (full.startswith(through_answer) and through_answer.startswith(prompt)):
        raise ModelError(
            "chat template is not prefix-stable: rendering a conversation does not start with the rendering "
            f"of its first {last} messages plus the generation prompt ({_parting(prompt, through_answer)}), so "
            "train and inference prompts would differ")
    from tunelab.families import end_of_turn

    marker = end_of_turn(tokenizer)
    # Where the template shows each answer; a search of the text would find the first place its words occur,
    # such as a user turn quoting them ("Repeat after me: cat"). Templates that rewrite contents fall back to it.
    located = {i: start for i, start, _end in _content_spans(tokenizer, messages, full, render_conversation) or []}
    cursor = 0
    for i in turns[:-1]:
        content = messages[i]["content"].strip()
        start = full.find(content, located.get(i, cursor))
        if not content or start < 0 or start >= len(prompt):
            raise ModelError(f"chat template does not write assistant message {i} as given (it rewrites or leaves "
                             "out part of it, as templates that drop earlier turns' reasoning do); cannot mask its "
                             "loss")
        spans.append((start, _answer_end(full, start + len(content), marker)))
        cursor = spans[-1][1]
    answer = through_answer[len(prompt):].rstrip()
    content = messages[last]["content"].strip()
    at = answer.find(content) if content else -1
    end = _answer_end(full, len(prompt) + at + len(content), marker) if at >= 0 else len(prompt) + len(answer)
    spans.append((len(prompt), end))
    return full, spans


def _parting(prompt: str, rendered: str) -> str:
    """Where a generation prompt and the finished conversation it should open part ways, in a few words."""
    at = next((i for i, (a, b) in enumerate(zip(prompt, rendered)) if a != b), min(len(prompt), len(rendered)))
    return f"the prompt goes on {prompt[at:at + 24]!r} where the conversation has {rendered[at:at + 24]!r}"


def _answer_end(full: str, end: int, marker: str | None) -> int:
    """Where an answer ending at `end` stops: past the end-of-turn marker that follows it, and the whitespace a
    template may write before the marker (`{{ content }}\n### end`), but not past anything the template writes
    after it, such as Phi-3's closing eos."""
    gap = len(full) - end - len(full[end:].lstrip())
    return end + gap + len(marker) if marker and full.startswith(marker, end + gap) else end


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> TokenizedExample:
    """Token ids of the whole conversation, with labels only on assistant tokens (IGNORE_INDEX elsewhere).
    Marker text inside a message's content is ordinary text, as in serving (encode_prompt_safely): a training
    row cannot forge a turn, and the model never learns to emit a marker from a message that quotes one."""
    text, spans = assistant_spans(tokenizer, messages)
    answers = [m for m in messages if m["role"] == "assistant"]
    spans = [span for span, m in zip(spans, answers) if m.get("weight", 1) != 0]  # weight 0: context only
    pieces: list[tuple[str, bool]] | None = [(text, False)]
    if holds_special_text(tokenizer, messages):
        pieces = _content_pieces(tokenizer, messages, text, render_conversation)
        if pieces is None:
            raise ModelError("a message holds special-token text, and this chat template rewrites message contents "
                             "so that they cannot be kept apart from its own markers")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for piece, is_content in pieces:
        if piece:
            # The template already writes any BOS/special tokens as text: adding them again would double them.
            enc = _encoder(tokenizer, is_content)(piece, add_special_tokens=False, return_offsets_mapping=True,
                                                  split_special_tokens=is_content)
            ids += enc["input_ids"]
            offsets += [(at + start, at + end) for start, end in enc["offset_mapping"]]
            at += len(piece)
    # A token belongs to an answer when it holds any of the answer's characters: one that starts on the space a
    # template writes before an answer (Mistral's " " + content: "Ġfox") is the answer's first token.
    labels = [ids[k] if any(start < e and s < max(end, start + 1) for s, e in spans) else IGNORE_INDEX
              for k, (start, end) in enumerate(offsets)]
    return TokenizedExample(ids, labels)


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: list[Record], system_prompt: str | None, max_length: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Tokenize records for training or loss evaluation: the encoded examples ({"id", "input_ids", "labels"},
    "replay": True for rehearsal rows) and the ids of records over `max_length` tokens (dropped, not truncated:
    truncation would cut off the answer)."""
    encoded, too_long = [], []
    for record in records:
        ex = tokenize_conversation(tokenizer, with_system_prompt(record.messages, system_prompt))
        if len(ex.input_ids) > max_length:
            too_long.append(record.id)
            continue
        encoded.append({"id": record.id, "input_ids": ex.input_ids, "labels": ex.labels,
                        **({"replay": True} if record.meta.get("replay") else {})})
    return encoded, too_long


def encode_prompt_safely(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of `render_prompt(tokenizer, messages)` in which marker text inside a message's content is
    ordinary text, never a special token: a user who writes an end-of-turn and a system-turn marker gets those
    characters, not a forged system turn. The template's own markers stay special tokens.

    Messages holding no special token's text get exactly the ids of tokenizing the rendering as a whole.
    Otherwise the rendering is cut at the contents: the template's pieces are tokenized with special tokens
    parsed, the contents with `split_special_tokens=True`. ModelError if the template rewrites contents so that
    they cannot be found in its rendering, or leaves out a system message (the answer would ignore it unsaid)."""
    text = render_prompt(tokenizer, messages)
    if leaves_out_system(messages, text):
        raise ModelError("the chat template leaves the system message out of the prompt; put the system text into "
                         "the first user turn")
    if not holds_special_text(tokenizer, messages):
        return token_ids(tokenizer, text)
    pieces = _content_pieces(tokenizer, messages, text, render_prompt)
    if pieces is None:
        raise ModelError("a message holds special-token text, and this chat template rewrites message contents "
                         "so that they cannot be kept apart from its own markers")
    ids: list[int] = []
    for piece, is_content in pieces:
        if piece:
            ids += token_ids(tokenizer, piece, split_special_tokens=is_content)
    return ids


def leaves_out_system(messages: list[Message], rendered: str) -> bool:
    """Whether `rendered`, a rendering of `messages`, lacks the text of their system message: a template with no
    system branch (Phi-3-mini's first) or one that writes it only at inference (Mistral v0.3's) drops it unsaid."""
    system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
    return bool(system) and system not in rendered


def holds_special_text(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> bool:
    """Whether any message's content contains the text of a special token."""
    specials = {str(t) for t in tokenizer.all_special_tokens}
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return any(s and s in m["content"] for m in messages for s in specials)


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, split_special_tokens: bool = False) -> list[int]:
    """`text`'s ids, without bos/eos, and nothing else computed: converting a long prompt's attention mask to
    Python holds the GIL, which a server tokenizing in a worker thread would feel."""
    return _encoder(tokenizer, split_special_tokens)(
        text, add_special_tokens=False, split_special_tokens=split_special_tokens, return_attention_mask=False,
        return_token_type_ids=False)["input_ids"]


_SPLITTING_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TWINS_LOCK = threading.Lock()


def _encoder(tokenizer: PreTrainedTokenizerBase, split_special_tokens: bool) -> PreTrainedTokenizerBase:
    """The tokenizer to call in this mode. A fast tokenizer keeps `split_special_tokens` as state on its one
    shared backend, switched by every call that asks for the other mode: two server threads, one encoding a
    forged marker as text and one encoding a template's own markers, would each tokenize with the other's
    setting (a garbled prompt, or a forged turn). So the tokenizer itself is only ever called to parse special
    tokens, and contents that must stay text go through a copy of it that only ever splits them."""
    if not split_special_tokens:
        return tokenizer
    with _TWINS_LOCK:
        twin = _SPLITTING_TWINS.get(tokenizer)
        if twin is None or len(twin) != len(tokenizer):  # tokens added since: copy again
            twin = _SPLITTING_TWINS[tokenizer] = copy.deepcopy(tokenizer)
    return twin


def _content_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[Message], text: str,
                    render: Any) -> list[tuple[str, bool]] | None:
    """`text` (`render(tokenizer, messages)`: render_prompt or render_conversation) cut into (piece,
    is_content) parts, or None where it cannot be."""
    if (spans := _content_spans(tokenizer, messages, text, render)) is None:
        return None
    pieces, at = [], 0
    for _, start, end in spans:
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    return [*pieces, (text[at:], False)]


def _content_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message], text: str,
                   render: Any) -> list[tuple[int, int, int]] | None:
    """(message index, start, end) of each message's content in `text`, in the order the template shows them,
    or None where they cannot be told apart. The contents are located by rendering with a unique placeholder
    in place of each (so a content quoted in another message is never mistaken for it); templates that trim
    contents are allowed for."""
    import uuid

    tag = uuid.uuid4().hex
    holders = [f"{tag}{i}x" for i in range(len(messages))]
    masked = render(tokenizer, [{**m, "content": h} for m, h in zip(messages, holders)])
    spans: list[tuple[int, int, int]] = []
    at, rest = 0, masked
    # In the order the template shows them (Mistral's puts the system message into the last user turn).
    shown_order = sorted((masked.find(h), i) for i, h in enumerate(holders) if h in masked)
    for _, i in shown_order:
        before, _, after = rest.partition(holders[i])
        if not text.startswith(before, at):
            return None
        at += len(before)
        content = messages[i]["content"]
        shown = next((c for c in (content, content.strip(), content.lstrip(), content.rstrip())
                      if text.startswith(c, at)), None)
        if shown is None:
            return None
        spans.append((i, at, at + len(shown)))
        at += len(shown)
        rest = after
    return spans if text[at:] == rest else None
