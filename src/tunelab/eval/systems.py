"""The systems an evaluation compares, all sharing one base model in memory where they can.

- base:     the base model, zero-shot (the tuned model with its adapter switched off);
- few_shot: the base model shown `few_shot_k` training examples before each question;
- tuned:    the run's model;
- other runs named in `eval.compare_runs`: their adapters loaded beside the run's own, by name.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.config import RunConfig
from tunelab.data.records import Record
from tunelab.errors import RunFolderError


@dataclass
class System:
    name: str
    few_shot: bool = False
    adapter: str | None = None  # PEFT adapter to activate; None = adapter off (base)
    model: Any = None  # a separate model (full fine-tuning) instead of the shared one


class Models:
    """The tuned model plus what is needed to switch between systems on it."""

    def __init__(self, tuned: Any, separate_base: Any) -> None:
        self.tuned = tuned
        self.separate_base = separate_base
        self.answer_cache: tuple[Path, str] | None = None  # (folder, base identity) for the base's answers

    @contextlib.contextmanager
    def use(self, system: System) -> Iterator[Any]:
        """Yield the network that plays `system`, with the right adapter active."""
        if system.model is not None:
            yield system.model
            return
        if self.separate_base is not None:  # full fine-tuning: base is a second model
            yield self.separate_base if system.adapter is None else self.tuned
            return
        if system.adapter is None:
            with self.tuned.disable_adapter():
                yield self.tuned
            return
        self.tuned.set_adapter(system.adapter)
        try:
            yield self.tuned
        finally:
            self.tuned.set_adapter("default")


def build_systems(cfg: RunConfig, models: Models) -> list[System]:
    systems = []
    for name in cfg.eval.systems:
        if name == "base":
            systems.append(System("base"))
        elif name == "few_shot":
            systems.append(System("few_shot", few_shot=True))
        else:
            systems.append(System("tuned", adapter="default"))
    for run_dir in cfg.eval.compare_runs:
        other = RunPaths(Path(run_dir))
        if models.separate_base is not None or not other.has_adapter:
            raise RunFolderError(f"eval.compare_runs: {run_dir} holds no adapter that can share this run's base model")
        name = Path(run_dir).name
        models.tuned.load_adapter(str(other.adapter), adapter_name=name)
        systems.append(System(name, adapter=name))
    return systems


def as_chat(record: Record) -> Record | None:
    """The row as prompt + reference answer: the chosen answer of a pair, a KTO row's answer when it is
    labelled good; None where there is no reference (bad KTO answers, raw text)."""
    if record.kind == "chat":
        return record
    if record.kind == "text":
        return None
    answer = record.chosen if record.kind == "preference" else record.completion if record.label else None
    if answer is None:
        return None
    return Record(record.id, record.source, "chat", [*record.messages, {"role": "assistant", "content": answer}])


def few_shot_examples(train: list[Record], k: int, seed: int) -> list[dict[str, str]]:
    """k training examples as alternating user/assistant turns, the same for every question: a preference
    pair shows its chosen answer, a KTO row its answer when labelled good (as eval scores against them).

    Task rows only: a rehearsal row (data.replay) shows the model general chat, not the task, and would make the
    few-shot baseline (and the gate rule against it) depend on the replay ratio."""
    answered = (as_chat(r) for r in train if not r.meta.get("replay"))
    chats = [c for c in answered if c is not None and len(c.messages) >= 2]
    if not chats:
        return []
    picked = random.Random(seed).sample(chats, min(k, len(chats)))
    turns: list[dict[str, str]] = []
    for record in picked:
        turns += [m for m in record.messages if m["role"] != "system"]
    return turns


def with_shots(conversation: list[dict[str, str]], shots: list[dict[str, str]]) -> list[dict[str, str]]:
    """Few-shot examples go after any system message and before the question."""
    if conversation and conversation[0]["role"] == "system":
        return [conversation[0], *shots, *conversation[1:]]
    return [*shots, *conversation]


def fit_shots(conversation: list[dict[str, str]], shots: list[dict[str, str]], fits: Any) -> tuple[list[Any], int]:
    """The question with as many of the shots as `fits` (a prompt-length check) allows, and how many were kept.

    Shots are dropped from the last one (a user turn and what follows it, up to the next user turn): a prompt past
    the model's context would be answered from positions it never learned, or crash a model whose position
    table ends there, and the few-shot baseline, with its gate rule, would measure that instead of the model."""
    starts = [i for i, m in enumerate(shots) if m["role"] == "user"] + [len(shots)]
    for kept in range(len(starts) - 1, 0, -1):
        shown = with_shots(conversation, shots[: starts[kept]])
        if fits(shown):
            return shown, kept
    return list(conversation), 0

