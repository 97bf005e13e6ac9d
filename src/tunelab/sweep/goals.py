"""What a sweep optimizes: the objective metric and the constraint rules, in the eval gate's own language.

Both are checked before any trial starts against the metrics the trial configs *will* measure (their suites,
systems, metrics, forgetting probes), so a typo or a rule naming a number nobody measures is a one-line error
instead of a sweep that fails after an hour. Reading a trial's numbers afterwards goes through
`tunelab.eval.gate.evaluate_gate`, the same code the gate uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.eval.gate import check_syntax, evaluate_gate, gate_rules
from tunelab.eval.probes import CATEGORIES
from tunelab.eval.result import failed_rules, rule_rows

LOWER_IS_BETTER = ("loss", "perplexity", "drop", "mean_words")


def direction(objective: str, mode: str) -> str:
    """max or min: `mode` when given, else min for losses, perplexity and forgetting drops."""
    if mode != "auto":
        return mode
    metric = objective.rpartition(".")[2]
    return "min" if any(metric == word or metric.endswith(f"_{word}") for word in LOWER_IS_BETTER) else "max"


def expected_metrics(cfg: RunConfig) -> dict[str, Any]:
    """A metrics.json skeleton with every number an eval of `cfg` writes (values 0): what rules may name."""
    systems = [*cfg.eval.systems, *(run.name for run in cfg.eval.compare_runs)]
    if cfg.objective.type == "reward":
        return {"suites": {"test": {"systems": {"tuned": {"pairwise_accuracy": 0.0}}}}, "forgetting": None}
    suites = {}
    for suite in cfg.eval.suites:
        names = [m for m in suite.metrics if m != "eval_loss"]
        if "eval_loss" in suite.metrics:
            names += ["eval_loss", "perplexity"]
        written = {s: [*names, "mean_words", *(["mean_shots"] if s == "few_shot" else [])] for s in systems}
        suites[suite.name] = {"systems": {s: dict.fromkeys(keys, 0.0) for s, keys in written.items()}}
    forgetting = None
    if cfg.eval.forgetting:
        probed = [s for s in ("base", "tuned") if s in cfg.eval.systems]
        forgetting = {"n_probes": 0, **{s: dict.fromkeys([*CATEGORIES, "overall"], 0.0) for s in probed}}
        if len(probed) == 2:
            forgetting.update(dict.fromkeys(["drop", *(f"{c}_drop" for c in CATEGORIES)], 0.0))
    skeleton: dict[str, Any] = {"suites": suites, "forgetting": forgetting}
    if cfg.eval.harness is not None:
        skeleton["harness"] = {"tasks": {t: {"base": 0.0, "tuned": 0.0, "drop": 0.0} for t in cfg.eval.harness.tasks}}
    return skeleton


def check_goals(objective: str, constraints: list[str], configs: list[RunConfig],
                labels: dict[str, str]) -> None:
    """Raise one ConfigError listing every objective or constraint that cannot be read or will not be measured
    by some trial. `labels` names where each came from (a flag or a config key) for the messages."""
    problems = []
    if not _readable(f"{objective} >= 0"):
        problems.append(f"{labels['objective']}: {objective!r} is not a metric name; write SYSTEM.METRIC "
                        "(tuned.exact_match), SUITE/SYSTEM.METRIC or forgetting.drop")
    rules = [(labels["constraints"], rule) for rule in constraints]
    if not problems:
        rules.insert(0, (labels["objective"], f"{objective} >= 0"))
    for cfg in configs:
        skeleton = expected_metrics(cfg)
        for where, rule in [*rules, *(("eval.gate", r) for r in gate_rules(cfg.eval, cfg.objective.type)[0])]:
            try:
                evaluate_gate([rule], skeleton)
            except ConfigError as err:
                reason = err.problems[0].split(": ", 1)[-1]
                shown = objective if where == labels["objective"] else rule
                problem = f"{where}: {shown!r}: {reason}{_hint(rule, cfg)}"
                if problem not in problems:
                    problems.append(problem)
    if problems:
        raise ConfigError(*problems)


def _readable(rule: str) -> bool:
    try:
        check_syntax(rule)
    except ConfigError:
        return False
    return True


def _hint(rule: str, cfg: RunConfig) -> str:
    if "forgetting." in rule and not cfg.eval.forgetting:
        return " (eval.forgetting is off; set it to true to measure forgetting)"
    return ""


@dataclass
class Outcome:
    """What one finished trial measured, judged against the sweep's goals."""

    objective: float | None
    rules: list[dict[str, Any]] = field(default_factory=list)  # {rule, passed, left, right}

    @property
    def feasible(self) -> bool:
        return not failed_rules(self.rules)

    def to_json(self) -> dict[str, Any]:
        return {"objective": self.objective, "constraints": self.rules, "feasible": self.feasible}


def measure(metrics: dict[str, Any], objective: str, constraints: list[str]) -> Outcome:
    """The objective's value and each constraint's verdict in a trial's eval/metrics.json."""
    value = evaluate_gate([f"{objective} >= 0"], metrics)[0].left
    return Outcome(value if math.isfinite(value) else None, rule_rows(evaluate_gate(constraints, metrics)))


def rank_key(objective: float, val_loss: float | None, index: int, mode: str) -> tuple[float, float, int]:
    """Sort key, best first: the objective, then (a tie) the lower final val loss, then the earlier trial."""
    loss = val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf
    return (-objective if mode == "max" else objective, loss, index)
