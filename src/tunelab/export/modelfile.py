"""An Ollama `Modelfile` for an exported GGUF: the run's chat template in Ollama's Go template language.

A Jinja chat template cannot be translated mechanically, so tunelab checks by behaviour: it recognises the
template's family (tunelab.families), fills in each of that family's Go templates with what it reads off the
Jinja renderings (the default system prompt, a system preamble, the eos text), renders probe conversations
with the Go template itself (export/gotemplate.py) and with the Jinja one, and keeps the first variant that
agrees on every probe, the way Ollama would prompt the model (its Modelfile SYSTEM inserted as the first
message when a request has none). A template that matches nothing is refused with an error rather than
approximated: a subtly wrong template silently degrades a fine-tuned model.

A template that writes fixed text ahead of every answer (Qwen3's empty `<think>\n\n</think>\n\n`) taught the model
to write it first; Ollama would show it as the start of each answer. The Modelfile's prompt ends with that text
instead (families.answer_lead), so the model goes straight on to the answer, as `tunelab serve` and eval show it.
Not where the run's answers reasoned inside that block (`reasoned_in_training`): an empty block in the prompt would
keep the model from reasoning, so it writes its block, and Ollama shows it.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Any

from tunelab.chat import without_default_bos
from tunelab.errors import GoTemplateError, TemplateError
from tunelab.export.gotemplate import render_go
from tunelab.families import FAMILIES, Family, answer_lead, detect, end_of_turn, reasoning_markers, split_reasoning

Message = dict[str, str]


# Distinctive texts, so that a template which drops or reorders a message cannot match by accident. Ollama
# renders a template to prompt the next answer, so every probe ends with a user turn.
_PROBES: tuple[list[Message], ...] = (
    [{"role": "user", "content": "Probe question one?"}],
    [{"role": "system", "content": "Probe system text."}, {"role": "user", "content": "Probe question two?"},
     {"role": "assistant", "content": "Probe answer two."}, {"role": "user", "content": "Probe question three?"}],
    [{"role": "user", "content": "Probe question four?"}, {"role": "assistant", "content": "Probe answer four."},
     {"role": "user", "content": "Probe question five?"}],
)
_SENTINEL = "\x00tunelab\x00"


@dataclass(frozen=True)
class OllamaTemplate:
    family: Family
    go_template: str
    default_system: str | None
    stops: tuple[str, ...]


def _go(template: str, messages: list[Message]) -> str:
    return render_go(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def _between(rendered: str, target: str) -> str | None:
    """The text that stands in `target` where the sentinel stands, once, in `rendered`."""
    if rendered.count(_SENTINEL) != 1:
        return None
    head, tail = rendered.split(_SENTINEL)
    if target.startswith(head) and target.endswith(tail) and len(target) >= len(head) + len(tail):
        return target[len(head):len(target) - len(tail)]
    return None


def _filled(variant: str, eos: str, lead: str) -> str:
    return variant.replace("@EOS@", eos).replace("@OPENING@", lead)


def _candidates(family: Family, eos: str, lead: str, first: str, jinja_first: str) -> list[tuple[str, str | None]]:
    """(Go template, default system) pairs to check: each variant with its placeholders read off the Jinja
    rendering of a lone user message."""
    user = [{"role": "user", "content": first}]
    found = []
    for variant in family.go_templates:
        template = _filled(variant, eos, lead)
        if "@PREAMBLE@" in template:
            preamble = _between(_go(template.replace("@PREAMBLE@", _SENTINEL), user), jinja_first)
            if preamble is None:
                continue
            template = template.replace("@PREAMBLE@", preamble)
        if _go(template, user) == jinja_first:
            found.append((template, None))
            continue
        system = _between(_go(template, [{"role": "system", "content": _SENTINEL}, *user]), jinja_first)
        if system:
            found.append((template, system))
    return found


def reasoned_in_training(tokenizer: Any, answers: Any) -> bool:
    """Whether any of the run's trained answers reasons inside the block its template opens every answer with."""
    markers = reasoning_markers(tokenizer)
    if markers is None:
        return False
    return any((split := split_reasoning(answer or "", markers)) is not None and split[0] for answer in answers)


def translate(tokenizer: Any, prefill_opening: bool = True) -> OllamaTemplate:
    """The Ollama template equivalent to `tokenizer.chat_template`, or a TemplateError naming what is known; with
    `prefill_opening`, its prompt ends with what the template writes ahead of every answer."""
    lead = answer_lead(tokenizer) if prefill_opening else ""
    if "{{" in lead:
        raise TemplateError(f"the chat template writes {lead!r} ahead of every answer, which cannot be written into an "
                            "Ollama template; cannot write an Ollama Modelfile (pass --no-modelfile)")

    def render(messages: list[Message]) -> str:
        # When the tokenizer adds a bos by default, so does Ollama: the Go template must not write it again.
        return without_default_bos(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)) + lead

    family = detect(tokenizer)
    known = ", ".join(FAMILIES)
    if family is None:
        raise TemplateError(f"the run's chat template belongs to none of the families tunelab can translate to an "
                            f"Ollama template ({known}); refusing to write a Modelfile that would prompt the model "
                            "differently from training (pass --no-modelfile to export the GGUF alone)")
    probes = _PROBES
    try:
        rendered = [render(messages) for messages in probes]
    except Exception:  # noqa: BLE001 - some templates (Mistral's v0.1/v0.2) refuse a system turn
        probes = tuple(p for p in _PROBES if p[0]["role"] != "system")
        try:
            rendered = [render(messages) for messages in probes]
        except Exception as err:  # noqa: BLE001 - a template that cannot render these is not translatable
            raise TemplateError(f"the chat template cannot render a plain conversation ({err}); "
                                "cannot write an Ollama Modelfile (pass --no-modelfile)") from None
    first = probes[0][0]["content"]
    closest = None  # the first difference seen, to show the user what did not match
    eos = tokenizer.eos_token or ""
    for template, system in _candidates(family, eos, lead, first, rendered[0]):
        try:
            for messages, text in zip(probes, rendered):
                go_text = _go(template, _with_system(messages, system))
                if go_text != text:
                    closest = closest or _first_difference(text, go_text)
                    break
            else:
                return OllamaTemplate(family, template, system, _stops(family, tokenizer))
        except GoTemplateError:
            continue
    if closest is None:  # no variant even fits a lone user message: show the plainest one against it
        plain = _filled(family.go_templates[0], eos, lead).replace("@PREAMBLE@", "")
        with contextlib.suppress(GoTemplateError):
            closest = _first_difference(rendered[0], _go(plain, list(probes[0])))
    shown = f" ({closest})" if closest else ""
    raise TemplateError(f"the run's chat template is a {family.name} template, but none of tunelab's {family.name} "
                        f"Ollama templates renders the probe conversations exactly as it does{shown}; refusing to "
                        "write a Modelfile that would prompt the model differently from training "
                        "(pass --no-modelfile)")


def _first_difference(jinja_text: str, go_text: str) -> str:
    """Where two renderings part, shown as a few characters of each (a missing bos text is the usual case)."""
    at = next((i for i, (a, b) in enumerate(zip(jinja_text, go_text)) if a != b), min(len(jinja_text), len(go_text)))
    start = max(0, at - 10)
    return (f"first difference at character {at}: the Jinja template writes {jinja_text[start:at + 30]!r}, "
            f"the Ollama template {go_text[start:at + 30]!r}")


def _with_system(messages: list[Message], system: str | None) -> list[Message]:
    # What Ollama does with the Modelfile's SYSTEM when a request brings no system message.
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _stops(family: Family, tokenizer: Any) -> tuple[str, ...]:
    stops = [end_of_turn(tokenizer), *family.stops, tokenizer.eos_token]
    return tuple(dict.fromkeys(s for s in stops if s))


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TemplateError('a system prompt containing """ cannot be written into a Modelfile')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: OllamaTemplate, system_prompt: str | None,
                   adapter_name: str | None = None) -> str:
    """The Modelfile: FROM the GGUF (and ADAPTER for a LoRA GGUF), TEMPLATE, SYSTEM, stop tokens.

    SYSTEM is the prompt the run trained with (`data.system_prompt`), else the template's own default."""
    system = system_prompt if system_prompt else template.default_system
    lines = [f"FROM {gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f"TEMPLATE {_quoted(template.go_template)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in template.stops]
    return "\n".join(lines) + "\n"
