"""Chat-template families: the one place that spells out a family's markers.

A family is what tunelab knows about a chat convention: the Jinja template it applies to a model that has
none (`data.chat_template: NAME`), the marker texts that template writes, and how to recognise the family in
any template by rendering a probe conversation (never by reading the template's source). Everything else
(end-of-turn and stop tokens, which markers a vocabulary lacks) is read off the rendered template itself, so
a custom template works the same way as a known one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]

_LOOP = "{% for message in messages %}"


@dataclass(frozen=True)
class Family:
    name: str
    models: str  # who uses it, for messages and docs
    template: str  # Jinja applied to a model without a template; the tokenizer's bos is prepended when it adds one
    markers: tuple[str, ...]  # marker texts the template writes (each must be one token of the vocabulary)
    signature: tuple[str, ...]  # all present in a rendering of the probe conversation: this family
    go_templates: tuple[str, ...] = ()  # Ollama templates for the family's variants (see export/modelfile.py)
    stops: tuple[str, ...] = ()  # texts Ollama should stop at besides the end-of-turn marker and eos
    # The markers swallow the whitespace after them when tokenizing, as Phi-3's tokenizer does (and llama.cpp
    # does for any GGUF named phi3): added markers must behave alike, or llama.cpp would tokenize differently.
    markers_rstrip: bool = False


# Ollama (Go text/template) renderings of each family. `@EOS@` stands for the tokenizer's eos text and
# `@PREAMBLE@` for text a template writes at the head of every system turn (Llama 3.1's knowledge-date lines),
# `@OPENING@` for what it writes ahead of every answer (answer_lead); export/modelfile.py fills them in and keeps
# a variant only if it renders the probes exactly as the Jinja does.
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
_CHATML_GO = ("{{- range $i, $_ := .Messages }}\n" + _LAST + """
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
@OPENING@{{ end }}
{{- end }}""")
_LLAMA3_GO = ("{{- range $i, $_ := .Messages }}\n" + _LAST + """
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

@OPENING@{{ end }}
{{- end }}""")
# Llama 3.1-3.3: a system turn always comes first, opened by the knowledge-date preamble.
_LLAMA31_GO = ("""{{- $sys := false }}
{{- range $j, $m := .Messages }}{{ if eq $m.Role "system" }}{{ $sys = true }}{{ end }}{{ end }}
{{- if not $sys }}<|start_header_id|>system<|end_header_id|>

@PREAMBLE@<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
""" + _LAST + """
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ if eq .Role "system" }}@PREAMBLE@{{ end }}{{ .Content }}<|eot_id|>
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

@OPENING@{{ end }}
{{- end }}""")
_GEMMA_GO = """{{- $system := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
@OPENING@{{ end }}
{{- else }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}"""
_MISTRAL_GO = """{{- $system := "" }}
{{- range $i, $_ := .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else }}{{ .Content }}@EOS@
{{- end }}
{{- end }}"""
# Mistral 7B Instruct v0.3 and later: the system text goes into the last user turn; "[/INST]" without a space.
_MISTRAL_V3_GO = """{{- $system := "" }}{{ $lastUser := 0 }}
{{- range $j, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $j }}{{ end }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if and $system (eq $i $lastUser) }}{{ $system }}

{{ end }}{{ .Content }}[/INST]
{{- else }} {{ .Content }}@EOS@
{{- end }}
{{- end }}"""
_PHI3_GO = ("{{- range $i, $_ := .Messages }}\n" + _LAST + """
<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ if and $last (ne .Role "assistant") }}<|assistant|>
@OPENING@{{ end }}
{{- end }}""")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "chatml", "Qwen 2/2.5/3, SmolLM2, many fine-tunes",
        _LOOP + "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"), ("<|im_start|>", "<|im_end|>"), (_CHATML_GO,), ("<|im_start|>",),
    ),
    Family(
        "llama3", "Llama 3, 3.1, 3.2, 3.3",
        _LOOP + "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + "
        "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|start_header_id|>", "<|eot_id|>"),
        (_LLAMA3_GO, _LLAMA31_GO), ("<|start_header_id|>",),
    ),
    Family(
        # Gemma has no system role: the system text opens the first user turn, as Google's template does.
        "gemma", "Gemma 2, Gemma 3",
        "{% set system = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + "
        "(system if loop.first else '') + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"), ("<start_of_turn>", "<end_of_turn>"), (_GEMMA_GO,), ("<start_of_turn>",),
    ),
    Family(
        # Mistral's answers end with the model's own end-of-sequence token; the system text opens the first
        # user turn (Mistral's templates have no system role).
        "mistral", "Mistral 7B Instruct, Mixtral, Mistral Nemo/Small",
        "{% set system = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}{% endif %}"
        "{% endfor %}",
        ("[INST]", "[/INST]"), ("[INST]", "[/INST]"), (_MISTRAL_GO, _MISTRAL_V3_GO), ("[INST]",),
    ),
    Family(
        "phi3", "Phi-3, Phi-3.5",
        _LOOP + "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ("<|user|>", "<|assistant|>", "<|end|>"),
        (_PHI3_GO,), ("<|user|>", "<|assistant|>"), markers_rstrip=True,
    ),
)}

DEFAULT_FAMILY = "chatml"

# A conversation every family renders; its distinctive texts cannot be mistaken for template text.
PROBE: list[Message] = [
    {"role": "system", "content": "Probe system text."},
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one."},
    {"role": "user", "content": "Probe question two?"},
]
_ANSWER = "Probe answer one."


def render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _render_probe(tokenizer: Any) -> str:
    try:
        return render(tokenizer, PROBE, True)
    except Exception:  # noqa: BLE001 - templates that refuse a system turn (some Mistral ones) still chat
        return render(tokenizer, PROBE[1:], True)


def detect(tokenizer: Any) -> Family | None:
    """The known family whose markers the tokenizer's template writes, or None (a custom template)."""
    if not tokenizer.chat_template:
        return None
    text = _render_probe(tokenizer)
    # Most specific first: phi3's <|end|> would otherwise not be told apart from a custom <|...|> template.
    for family in FAMILIES.values():
        if all(s in text for s in family.signature):
            return family
    return None


_MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>|<[a-z_]{2,40}>|\[/?[A-Z_]{2,20}\]")


def end_of_turn(tokenizer: Any) -> str | None:
    """The text the template writes right after an assistant answer (its end-of-turn marker), or None."""
    return _answer_ending(tokenizer)[0]


def gap_before_end(tokenizer: Any) -> str:
    """The whitespace the template writes between an answer and its end-of-turn marker ("\n" in
    `{{ content }}\n### end`): the model learns to generate it, but it is not part of the answer."""
    return _answer_ending(tokenizer)[1]


def _answer_ending(tokenizer: Any) -> tuple[str | None, str]:
    return _remembered(tokenizer, _find_end_of_turn)


# What a template's renderings say, by (finder, template, eos): asked once per training example or served
# answer, found once.
_FOUND: dict[tuple[Any, str | None, str | None], Any] = {}


def _remembered(tokenizer: Any, find: Any) -> Any:
    key = (find, tokenizer.chat_template, tokenizer.eos_token)
    if key not in _FOUND:
        _FOUND[key] = find(tokenizer)
    return _FOUND[key]


def _find_end_of_turn(tokenizer: Any) -> tuple[str | None, str]:
    """(end-of-turn marker, the whitespace before it)."""
    text = _render_probe(tokenizer)
    at = text.find(_ANSWER)
    if at < 0:
        return None, ""
    after = text[at + len(_ANSWER):]
    gap = after[: len(after) - len(after.lstrip())]
    marker = _marker_in(tokenizer, after.lstrip())
    return marker, gap if marker else ""


def _marker_in(tokenizer: Any, after: str) -> str | None:
    # The next turn may follow with no space between (Llama 3: "<|eot_id|><|start_header_id|>"; Mistral:
    # "</s>[INST]"): take the eos or the one marker-shaped text that comes first.
    eos = tokenizer.eos_token
    if eos and after.startswith(eos):
        return eos
    marker = _MARKER.match(after)
    if marker:
        return marker.group(0)
    # A plain-text marker is the line after the answer ("### end"), unless that line is already the next turn
    # ("User: Probe question two?"): then the turn's first word, its opener, is what ends an answer.
    line = after.split("\n", 1)[0].strip()
    if line and PROBE[3]["content"] not in line:
        return line
    words = after.split()
    return words[0] if words else None


def answer_opening(tokenizer: Any) -> str:
    """What the template writes, whitespace aside, between its generation prompt and the content of a final
    answer (Qwen3: an empty `<think>\n\n</think>` block), or "". Training teaches the model to write it, as the
    answer's first tokens; it is not part of the answer, so eval and serving take it off (`after_opening`)."""
    return answer_lead(tokenizer).strip()


def answer_lead(tokenizer: Any) -> str:
    """The same text with its whitespace, exactly as the template writes it ahead of an answer's content
    ("<think>\n\n</think>\n\n"), or "" where that is whitespace or nothing. An Ollama Modelfile ends its prompt
    with it, so that the model there answers straight away as it learnt to after writing it."""
    lead = _remembered(tokenizer, _find_lead) if tokenizer.chat_template else ""
    return lead if lead.strip() else ""


def _find_lead(tokenizer: Any) -> str:
    question = PROBE[1]
    try:
        prompt = render(tokenizer, [question], True)
        full = render(tokenizer, [question, {"role": "assistant", "content": _ANSWER}], False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no opening to take off
        return ""
    at = full.find(_ANSWER, len(prompt))
    return full[len(prompt):at] if full.startswith(prompt) and at >= 0 else ""


def after_opening(text: str, opening: str) -> str | None:
    """`text`, an answer as generated, without the template's `opening` and the whitespace after it; None while
    `text` may still become the opening (a stream holds it back). Text that does not open so is returned as is."""
    if not opening:
        return text
    head = text.lstrip()
    if head.startswith(opening):
        return head[len(opening):].lstrip()
    return None if opening.startswith(head) else text


def reasoning_markers(tokenizer: Any) -> tuple[str, str] | None:
    """(opening tag, closing tag) where what the template writes ahead of every answer is an empty reasoning block,
    the two tags with only whitespace between (Qwen3's `<think>\n\n</think>`): a model trained on it may write its
    reasoning there, which serving returns apart from the answer and eval does not score. None otherwise."""
    tags = answer_opening(tokenizer).split()
    if len(tags) == 2 and tags[1] == tags[0][:1] + "/" + tags[0][1:]:
        return tags[0], tags[1]
    return None


def split_reasoning(text: str, markers: tuple[str, str]) -> tuple[str | None, str, bool] | None:
    """(reasoning, answer, closed) of an answer as generated: reasoning None where the text does not open with the
    opening tag (all of it is the answer); closed False while the block is still being written (the answer is "",
    the reasoning all of it so far). None while the text may still become the opening tag (a stream holds it)."""
    opening, closing = markers
    head = text.lstrip()
    if not head.startswith(opening):
        return None if opening.startswith(head) else (None, text, True)
    rest = head[len(opening):]
    if closing not in rest:
        return rest.lstrip(), "", False
    thought, answer = rest.split(closing, 1)
    return thought.strip(), answer.lstrip(), True


def answer_part(tokenizer: Any, text: str, keep_reasoning: bool = False) -> str:
    """What eval scores of an answer, as generated or as a reference: the text after a reasoning block (nothing, if
    it was cut off inside one) or after the template's fixed opening; text cut off inside the opening as written.
    `keep_reasoning`: only the fixed (empty) opening is taken off, a block with reasoning in it is kept (replay rows
    train the model to answer as the base did, reasoning included)."""
    markers = None if keep_reasoning else reasoning_markers(tokenizer)
    split = split_reasoning(text, markers) if markers else None
    if split is not None:
        return split[1]
    shown = after_opening(text, answer_opening(tokenizer))
    return text if shown is None else shown


def single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer: Any, model: Any = None, config: Any = None) -> list[int]:
    """Ids that end an answer: the template's end-of-turn token, the tokenizer's eos, and any end ids the
    model's generation config (or, before a model is loaded, its `config`) lists."""
    ids = {tokenizer.eos_token_id}
    marker = end_of_turn(tokenizer) if tokenizer.chat_template else None
    if marker:
        ids.add(single_token_id(tokenizer, marker))
    configured = getattr(config or getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def stop_texts(tokenizer: Any) -> list[str]:
    """End-of-turn texts to cut an answer at, for a template whose marker is not a single token."""
    marker = end_of_turn(tokenizer) if tokenizer.chat_template else None
    return [marker] if marker and single_token_id(tokenizer, marker) is None else []


def template_markers(tokenizer: Any) -> list[str]:
    """Marker-like texts the template writes (for a known family: its markers; else `<|...|>`, `<...>`,
    `[INST]`-shaped texts of a rendering), in order of first appearance."""
    family = detect(tokenizer)
    if family is not None:
        return list(family.markers)
    return list(dict.fromkeys(_MARKER.findall(_render_probe(tokenizer))))


def missing_markers(tokenizer: Any) -> list[str]:
    """The template's markers that are not single tokens of the vocabulary."""
    return [m for m in template_markers(tokenizer) if single_token_id(tokenizer, m) is None]


def template_for(choice: str, bos_token: str | None) -> str:
    """The Jinja text of `data.chat_template: choice` (a family name); the tokenizer's bos opens it when the
    tokenizer adds one by default (a base model was pretrained with it in front)."""
    body = FAMILIES[choice].template
    return ("{{ bos_token }}" + body) if bos_token else body


def describe(tokenizer: Any) -> str:
    family = detect(tokenizer)
    return family.name if family else "custom"
