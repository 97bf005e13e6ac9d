"""The regression gate: rules over eval metrics that must hold for a run to pass.

A rule compares a metric with a number or with another metric plus an offset:
    tuned.exact_match >= base.exact_match + 0.2
    tuned.exact_match >= few_shot.exact_match
    forgetting.drop <= 0.02
`SYSTEM.METRIC` refers to the first suite; `SUITE/SYSTEM.METRIC` to a named one. `forgetting.drop` is the
base pass rate on the forgetting probes minus the tuned one (and `forgetting.<category>_drop` per category).
`harness.TASK.base`, `harness.TASK.tuned` and `harness.TASK.drop` are a standard benchmark's scores
(eval.harness); its drop has the same sign: positive when tuning lost ground.

Without `eval.gate` in the config the default gate applies (`default_rules`): the tuned model beats the base on the
first suite's first metric, is not worse than few-shot, and loses at most 5 points on the forgetting probes.
`eval.gate: []` switches the gate off on purpose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.config import EvalConfig

# harness.TASK.NUMBER comes first: lm-eval task names may hold dots and parentheses (longproc_countdown_0.5k).
_REF = r"(?:harness\.[\w().-]+\.[A-Za-z_]\w*|[A-Za-z_][\w-]*(?:/[A-Za-z_][\w-]*)?\.[A-Za-z_]\w*)"
_RULE = re.compile(rf"^\s*({_REF})\s*(>=|<=|>|<|==)\s*(?:({_REF})|(-?\d+(?:\.\d+)?))\s*(?:([+-])\s*(\d+(?:\.\d+)?))?\s*$")
# Comparisons within float rounding: 0.1 + 0.2 is 0.30000000000000004, and a 5-point probe drop computed as
# 0.14 - 0.09 is 0.05000000000000002. Equal within a billionth counts as equal (>= and <= pass, > and < fail).
_TOLERANCE = 1e-9
_OPS = {">=": lambda a, b: a >= b - _tol(a, b), "<=": lambda a, b: a <= b + _tol(a, b),
        ">": lambda a, b: a > b + _tol(a, b), "<": lambda a, b: a < b - _tol(a, b),
        "==": lambda a, b: abs(a - b) <= _tol(a, b)}


def _tol(a: float, b: float) -> float:
    return _TOLERANCE * max(1.0, abs(a), abs(b))


@dataclass
class RuleResult:
    rule: str
    passed: bool
    left: float
    right: float

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.rule}  ({self.left:.4f} vs {self.right:.4f})"


DEFAULT_FORGETTING_DROP = 0.05
LOWER_IS_BETTER = {"eval_loss", "perplexity"}


def default_rules(eval_cfg: EvalConfig, objective: str = "sft") -> list[str]:
    """The gate a config gets when it says nothing: built only from numbers this config measures.

    A custom `package.module:function` metric is skipped for the "first metric" (its name is not a plain word);
    loss-like metrics must go down instead of up. Continued pre-training (cpt) is judged by the loss on held-out
    text, which few-shot examples have no part in.
    """
    rules: list[str] = []
    systems = eval_cfg.systems
    metric = next((m for m in eval_cfg.suites[0].metrics if re.fullmatch(r"[A-Za-z_]\w*", m)), None)
    metric = "eval_loss" if objective == "cpt" else metric
    if "tuned" in systems and metric is not None:
        better, at_least = ("<", "<=") if metric in LOWER_IS_BETTER else (">", ">=")
        if "base" in systems:
            rules.append(f"tuned.{metric} {better} base.{metric}")
        if "few_shot" in systems and objective != "cpt":
            rules.append(f"tuned.{metric} {at_least} few_shot.{metric}")
    if eval_cfg.forgetting and "tuned" in systems and "base" in systems:  # the drop is base's pass rate - tuned's
        rules.append(f"forgetting.drop <= {DEFAULT_FORGETTING_DROP}")
    return rules


def gate_rules(eval_cfg: EvalConfig, objective: str = "sft") -> tuple[list[str], str]:
    """The rules in force and where they come from: "config", "default", or "none".

    A reward model measures one number and no base, so the default gate has nothing to compare there."""
    if eval_cfg.gate is not None:
        return list(eval_cfg.gate), "config"
    if objective == "reward":
        return [], "none"
    return default_rules(eval_cfg, objective), "default"


def check_syntax(rule: str) -> None:
    if not _RULE.match(rule):
        raise ConfigError(f"eval.gate: cannot read rule {rule!r}; write e.g. 'tuned.exact_match >= base.exact_match "
                          "+ 0.2', 'forgetting.drop <= 0.02' or 'harness.mmlu.drop <= 0.02'")


def _lookup(ref: str, metrics: dict[str, Any]) -> float:
    head, _, metric = ref.rpartition(".")
    if head == "forgetting":
        table = metrics.get("forgetting") or {}
        if metric not in table:
            raise ConfigError(f"eval.gate: '{ref}' is not measured (forgetting probes off, or no such number)")
        return float(table[metric])
    if head.startswith("harness.") or head == "harness":
        return _harness_lookup(ref, head.partition(".")[2], metric, metrics.get("harness"))
    suites = metrics["suites"]
    suite, _, system = head.rpartition("/")
    suite = suite or next(iter(suites))
    try:
        return float(suites[suite]["systems"][system][metric])
    except KeyError:
        raise ConfigError(f"eval.gate: '{ref}' was not measured (suites: {', '.join(suites)}; systems: "
                          f"{', '.join(suites[next(iter(suites))]['systems'])})") from None


def _harness_lookup(ref: str, task: str, number: str, harness: dict[str, Any] | None) -> float:
    tasks = (harness or {}).get("tasks", {})
    if task not in tasks:
        measured = f"measured: {', '.join(tasks)}" if tasks else "eval.harness is off"
        raise ConfigError(f"eval.gate: '{ref}' is not measured ({measured}); write harness.TASK.drop, .base or .tuned")
    value = tasks[task].get(number)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"eval.gate: '{ref}' is not measured; a harness task has base, tuned and drop")
    return float(value)


def describe_failure(row: dict[str, Any]) -> str:
    """A failed rule of metrics.json's gate, for people: 'RULE (measured 0.1000, needed > 0.2000)'."""
    if row.get("error"):
        return f"{row['rule']} (not measured: {row['error']})"
    found = _RULE.match(row["rule"])
    needed = f"{found.group(2) if found else 'vs'} {row['right']:.4f}"  # "> 0.0000": a strict rule reads right
    return f"{row['rule']} (measured {row['left']:.4f}, needed {needed})"


def evaluate_gate(rules: list[str], metrics: dict[str, Any]) -> list[RuleResult]:
    results = []
    for rule in rules:
        check_syntax(rule)
        left_ref, op, right_ref, number, sign, offset = _RULE.match(rule).groups()  # type: ignore[union-attr]
        left = _lookup(left_ref, metrics)
        right = _lookup(right_ref, metrics) if right_ref else float(number)
        if offset:
            right = right + float(offset) if sign == "+" else right - float(offset)
        results.append(RuleResult(rule.strip(), bool(_OPS[op](left, right + 0.0)), left, right))
    return results
