"""An Ollama `Modelfile` for an exported GGUF: the run's chat template in Ollama's Go template language.

A Jinja chat template cannot be translated mechanically, so tunelab recognises template families by
behaviour: it renders probe conversations with the run's template and with a reference renderer of each
family it knows, and uses that family's Go template only if every rendering is identical (system message or
not, several turns, with and without the generation prompt). A template that matches no family is refused
with an error rather than approximated: a subtly wrong template silently degrades a fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError

Message = dict[str, str]


class TemplateError(TunelabError):
    """The chat template cannot be expressed as an Ollama template."""


@dataclass(frozen=True)
class Family:
    name: str
    go_template: str
    stops: tuple[str, ...]
    render: Callable[[list[Message], str | None, bool], str]  # (messages, default system, generation prompt)
    default_system: Callable[[str], str | None]  # the default system prompt, read off a rendering without one


def _chatml(messages: list[Message], default_system: str | None, generation_prompt: bool) -> str:
    if default_system is not None and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def _chatml_default_system(rendered: str) -> str | None:
    head = "<|im_start|>system\n"
    if rendered.startswith(head) and "<|im_end|>" in rendered:
        return rendered[len(head):rendered.index("<|im_end|>")]
    return None


# Ollama inserts the Modelfile's SYSTEM as the first message when a request has none, which is what templates
# with a built-in default system prompt (SmolLM2's) do; the generation prompt follows a last non-assistant turn.
CHATML_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

FAMILIES = (Family("chatml", CHATML_GO, ("<|im_end|>", "<|im_start|>"), _chatml, _chatml_default_system),)

# Distinctive texts, so that a template which drops or reorders a message cannot match by accident.
_PROBES: tuple[tuple[list[Message], bool], ...] = (
    ([{"role": "user", "content": "Probe question one?"}], True),
    ([{"role": "system", "content": "Probe system text."}, {"role": "user", "content": "Probe question two?"},
      {"role": "assistant", "content": "Probe answer two."}, {"role": "user", "content": "Probe question three?"}],
     True),
    ([{"role": "user", "content": "Probe question four?"}, {"role": "assistant", "content": "Probe answer four."}],
     False),
)


@dataclass(frozen=True)
class OllamaTemplate:
    family: Family
    default_system: str | None


def translate(tokenizer: Any) -> OllamaTemplate:
    """The Ollama template equivalent to `tokenizer.chat_template`, or a TemplateError naming what is known."""
    def render(messages: list[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        rendered = [render(messages, gen) for messages, gen in _PROBES]
    except Exception as err:  # noqa: BLE001 - a template that cannot render the probes is simply not translatable
        raise TemplateError(f"the chat template cannot render a plain conversation ({err}); "
                            "cannot write an Ollama Modelfile (pass --no-modelfile)") from None
    for family in FAMILIES:
        default = family.default_system(rendered[0])
        if all(family.render(messages, default, gen) == text for (messages, gen), text in zip(_PROBES, rendered)):
            return OllamaTemplate(family, default)
    known = ", ".join(f.name for f in FAMILIES)
    raise TemplateError(f"the run's chat template is none that tunelab can translate to an Ollama template "
                        f"(known: {known}); refusing to write a Modelfile that would prompt the model differently "
                        "from training (pass --no-modelfile to export the GGUF alone)")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TemplateError('a system prompt containing """ cannot be written into a Modelfile')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: OllamaTemplate, system_prompt: str | None, eos_token: str | None,
                   adapter_name: str | None = None) -> str:
    """The Modelfile: FROM the GGUF (and ADAPTER for a LoRA GGUF), TEMPLATE, SYSTEM, stop tokens.

    SYSTEM is the prompt the run trained with (`data.system_prompt`), else the template's own default."""
    stops = list(template.family.stops)
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    system = system_prompt if system_prompt else template.default_system
    lines = [f"FROM {gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f"TEMPLATE {_quoted(template.family.go_template)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
