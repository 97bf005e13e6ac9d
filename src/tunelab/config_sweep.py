"""Config section for `tunelab sweep`: the search space, what to optimize, and how trials run on Ray Tune.

Part of the one RunConfig (tunelab.config); only the sweep command reads it. Every other command ignores it,
so a sweep's base config still trains as an ordinary run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tunelab.config_section import Section


class SweepConfig(Section):
    params: dict[str, list[Any] | str] = Field(
        default_factory=dict,
        description="Config keys to search: KEY: [v1, v2, ...] (values to try) or KEY: 'loguniform(a, b)' / "
        "'uniform(a, b)' / 'randint(a, b)' (both ends included). `--param KEY=...` on the command line adds or "
        "replaces one key.",
    )
    search: Literal["auto", "grid", "random"] = Field(
        "auto", description="grid: every combination of the value lists; random: `samples` draws (needed for "
        "distributions); auto: grid when every key is a list of values, else random."
    )
    samples: int | None = Field(
        None, gt=0, le=10_000, description="Random search: how many trials to draw (default 10). A grid runs every "
        "combination once."
    )
    seed: int = Field(0, description="Seed of the random draws (the trial list is drawn once, before any trial runs).")
    objective: str = Field(
        "tuned.exact_match",
        description="The metric to optimize, named as in eval.gate rules: SYSTEM.METRIC (first suite), "
        "SUITE/SYSTEM.METRIC, or forgetting.drop.",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether a higher or lower objective is better; auto: lower for losses, perplexity and "
        "forgetting drops, higher otherwise."
    )
    constraints: list[str] = Field(
        default_factory=list,
        description="eval.gate rules every winning trial must meet, e.g. 'forgetting.drop <= 0.03'. A trial that "
        "breaks one can never be the best.",
    )
    max_concurrent: int | None = Field(
        None, gt=0, description="Trials running at once; default: as many as the Ray cluster's resources allow."
    )
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs each trial reserves on the Ray cluster.")
    gpus_per_trial: float | None = Field(
        None, ge=0, description="GPUs each trial reserves; default: 1 when the Ray cluster has GPUs, else 0."
    )
    early_stopping: bool | None = Field(
        None, description="ASHA: stop trials whose val loss trails the others' at the same step. Needs "
        "train.eval_steps; default: on when train.eval_steps is set."
    )
    grace_steps: int | None = Field(
        None, gt=0, description="ASHA: no trial is stopped before this many training steps; default: train.eval_steps."
    )
    reduction_factor: float = Field(
        3.0, gt=1, description="ASHA: at each rung (grace_steps x reduction_factor^k steps) only the best "
        "1/reduction_factor of the trials go on."
    )

    @field_validator("params")
    @classmethod
    def _params_parse(cls, params: dict[str, list[Any] | str]) -> dict[str, list[Any] | str]:
        from tunelab.errors import ConfigError
        from tunelab.sweep.space import parse_spec

        for key, value in params.items():
            try:
                parse_spec(key, value, f"sweep.params.{key}")
            except ConfigError as err:
                raise ValueError(err.problems[0]) from None
        return params

    @field_validator("constraints")
    @classmethod
    def _rules_parse(cls, rules: list[str]) -> list[str]:
        from tunelab.errors import ConfigError
        from tunelab.eval.gate import check_syntax

        for rule in rules:
            try:
                check_syntax(rule)
            except ConfigError as err:
                raise ValueError(err.problems[0].replace("eval.gate:", "sweep.constraints:", 1)) from None
        return rules
