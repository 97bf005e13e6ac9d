"""Reward functions for GRPO: built-ins by name, your own by import path, or a trained reward model.

Every function takes TRL's arguments (completions, plus dataset columns such as `answer`) and returns one
float per completion. In `objective.rewards`:
- "exact_match": 1 when the completion equals the row's reference answer (normalized);
- "regex": 1 when the completion matches `objective.reward_regex`;
- "json_valid": 1 when the completion parses as JSON;
- "length_penalty": 0 up to `objective.target_words` words, then minus the excess share;
- "package.module:function": any function with the same signature;
- "reward_model:RUNS/rm": a reward model trained with `objective.type: reward`.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.config import ObjectiveConfig
from tunelab.errors import ConfigError
from tunelab.eval.metrics import normalize_answer
from tunelab.progress import console

RewardFn = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as message lists and plain ones as strings."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def exact_match(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    return [float(normalize_answer(completion_text(c)) == normalize_answer(a)) for c, a in zip(completions, answer)]


def json_valid(completions: list[Any], **_: Any) -> list[float]:
    def ok(text: str) -> float:
        try:
            json.loads(text)
            return 1.0
        except ValueError:
            return 0.0

    return [ok(completion_text(c).strip()) for c in completions]


def regex_reward(pattern: str) -> RewardFn:
    compiled = _compiled(pattern)

    def regex(completions: list[Any], **_: Any) -> list[float]:
        return [float(bool(compiled.search(completion_text(c)))) for c in completions]

    return regex


def length_penalty_reward(target_words: int) -> RewardFn:
    def length_penalty(completions: list[Any], **_: Any) -> list[float]:
        return [-max(0, len(completion_text(c).split()) - target_words) / target_words for c in completions]

    return length_penalty


def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"objective.reward_regex: {pattern!r} is not a valid regular expression: {err}") from None


def check_rewards(cfg: ObjectiveConfig) -> None:
    """Every `objective.rewards` entry can be made, checked before any data is written or weights load (a dry
    run included): names, the regex, importable functions, reward-model run folders."""
    for name in cfg.rewards:
        if name == "regex":
            if not cfg.reward_regex:
                raise ConfigError("objective.rewards: 'regex' needs objective.reward_regex (the pattern to reward)")
            _compiled(cfg.reward_regex)
        elif name.startswith("reward_model:"):
            folder = Path(name.split(":", 1)[1])
            config = RunPaths(folder).adapter_config
            if not config.is_file() or json.loads(config.read_text()).get("task_type") != "SEQ_CLS":
                raise ConfigError(f"objective.rewards: {name}: {folder} is not a reward-model run (train one with "
                                  "objective.type: reward)")
        elif ":" in name:
            _import(name)
        elif name not in ("exact_match", "json_valid", "length_penalty"):
            raise ConfigError(f"objective.rewards: unknown reward '{name}'; use exact_match, regex, json_valid, "
                              "length_penalty, package.module:function, or reward_model:RUN_DIR")


def resolve_rewards(cfg: ObjectiveConfig) -> list[Any]:
    """Turn `objective.rewards` entries into TRL reward functions (or a reward model)."""
    check_rewards(cfg)
    out: list[Any] = []
    for name in cfg.rewards:
        if name == "exact_match":
            out.append(exact_match)
        elif name == "json_valid":
            out.append(json_valid)
        elif name == "regex":
            if not cfg.reward_regex:
                raise ConfigError("objective.rewards: 'regex' needs objective.reward_regex (the pattern to reward)")
            out.append(regex_reward(cfg.reward_regex))
        elif name == "length_penalty":
            out.append(length_penalty_reward(cfg.target_words))
        elif name.startswith("reward_model:"):
            from tunelab.train.reward_model import load_reward_model

            out.append(load_reward_model(Path(name.split(":", 1)[1])))
        elif ":" in name:
            out.append(_import(name))
        else:
            raise ConfigError(f"objective.rewards: unknown reward '{name}'; use exact_match, regex, json_valid, "
                              "length_penalty, package.module:function, or reward_model:RUN_DIR")
    return out


def _import(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"objective.rewards: cannot import '{path}': {err}") from None
    if not callable(fn):
        raise ConfigError(f"objective.rewards: '{path}' is not a function")
    return fn


def warn_if_rewards_never_differed(metrics: Path) -> None:
    """GRPO learns from reward differences within a group of answers to one prompt: if every group's answers got
    equal rewards at every logged step (TRL's frac_reward_zero_std is 1), every advantage was zero, and the adapter
    learnt nothing from the rewards. Said after training, so the run is not taken for a result."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()] if metrics.is_file() else []
    fractions = [row["frac_reward_zero_std"] for row in rows if "frac_reward_zero_std" in row]
    if fractions and min(fractions) >= 1.0:
        console.print("[yellow]warning:[/] GRPO: at every logged step, every group of answers to a prompt got equal "
                      "rewards (frac_reward_zero_std 1.0 in metrics.jsonl), so nothing was learnt from them: give "
                      "partial credit (a reward that tells better from worse answers), raise objective.temperature "
                      "or objective.num_generations, or start from a model that sometimes gets it right")
