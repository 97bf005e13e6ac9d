"""What tunelab detected about a model, without loading a weight: architecture, size, chat template family,
end-of-turn and stop tokens, base or chat model. Printed by `tunelab run --dry-run` and the run summary."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.config import RunConfig


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    parameters: int
    kind: str  # "chat" (ships a chat template) or "base"
    template: str  # family and where the template comes from, or "none (raw text)"
    end_of_turn: str | None
    stop_tokens: tuple[str, ...]
    context: int | None = None  # positions the model was trained for (max_position_embeddings)

    def lines(self, max_length: int | None = None) -> list[str]:
        """What was detected; with the run's `max_length`, a "warning:" line when rows may outrun the context."""
        stops = ", ".join(self.stop_tokens) or "none"
        lines = [
            f"architecture: {self.architecture}, {self.parameters / 1e6:,.1f}M parameters, {self.kind} model"
            + (f", context {self.context:,} tokens" if self.context else ""),
            f"chat template: {self.template}",
            f"end of turn: {self.end_of_turn or 'none'}; generation stops at: {stops}",
        ]
        if self.context and max_length and max_length > self.context:
            lines.append(f"warning: data.max_length {max_length:,} is longer than the model's context "
                         f"({self.context:,} tokens): rows longer than the context are dropped (the data report "
                         f"counts them as too_long), as positions it never saw would not serve; set "
                         f"data.max_length to {self.context:,} or less")
        return lines


def model_facts(cfg: RunConfig) -> ModelFacts:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.chat import setup_chat_template
    from tunelab.families import end_of_turn, stop_token_ids
    from tunelab.models import locate_model, tokenizer_for, trusts_code

    source = locate_model(cfg.model)
    config = _model_config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trusts_code(source.path))
        parameters = sum(p.numel() for p in model.parameters())
    tokenizer = tokenizer_for(cfg.model)
    kind = "chat" if tokenizer.chat_template else "base"
    context = _context(config)
    if cfg.objective.type == "cpt":
        return ModelFacts(_architecture(config), parameters, kind, "none (cpt trains on raw text)", None,
                          tuple(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))), context)
    setup = setup_chat_template(tokenizer, cfg.data.chat_template)
    return ModelFacts(_architecture(config), parameters, kind, setup.describe(), end_of_turn(tokenizer),
                      tuple(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, config=config))), context)


def model_context(cfg: RunConfig) -> int | None:
    """The positions the model was trained for (max_position_embeddings), read from its config alone (a GGUF's
    from its header: transformers parses the whole file for its config, seconds for every data prep)."""
    from tunelab.models import locate_model

    source = locate_model(cfg.model)
    if source.kind in ("bundled", "gguf"):
        found = gguf_context(source.path)
        if found is not None:
            return found
    return _context(_model_config(source))


# GGUF metadata value types (ggml's gguf.h) that are fixed-size scalars, by their struct format.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_context(path: Path) -> int | None:
    """`ARCH.context_length` from a GGUF file's metadata, reading only as far as that key (None: not found)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:  # v1 had 32-bit lengths
            return None
        _tensors, count = struct.unpack("<QQ", f.read(16))
        arch = None
        for _ in range(count):
            key = _gguf_string(f)
            value = _gguf_value(f, struct.unpack("<I", f.read(4))[0])
            if key == "general.architecture":
                arch = value
            elif arch is not None and key == f"{arch}.context_length":
                return int(value)
    return None


def _gguf_string(f: Any) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", "replace")


def _gguf_value(f: Any, kind: int) -> Any:
    if kind == _GGUF_STRING:
        return _gguf_string(f)
    if kind == _GGUF_ARRAY:  # skipped: no array is needed here
        item, length = struct.unpack("<IQ", f.read(12))
        if item in _GGUF_SCALARS:
            f.seek(length * struct.calcsize(_GGUF_SCALARS[item]), 1)
        else:
            for _ in range(length):
                _gguf_value(f, item)
        return None
    fmt = _GGUF_SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _model_config(source: Any) -> Any:
    from transformers import AutoConfig

    from tunelab.models import trusts_code

    if source.kind in ("bundled", "gguf"):
        return AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
    return AutoConfig.from_pretrained(source.path, trust_remote_code=trusts_code(source.path))


def _context(config: Any) -> int | None:
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def _architecture(config: object) -> str:
    names = getattr(config, "architectures", None) or []
    return names[0] if names else type(config).__name__.replace("Config", "")
