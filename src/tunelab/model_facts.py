"""What tunelab detected about a model, without loading a weight: architecture, size, chat template family,
end-of-turn and stop tokens, base or chat model. Printed by `tunelab run --dry-run` and the run summary."""

from __future__ import annotations

from dataclasses import dataclass
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
    """The positions the model was trained for (max_position_embeddings), read from its config alone."""
    from tunelab.models import locate_model

    return _context(_model_config(locate_model(cfg.model)))


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
