"""The regression gate: rules over eval metrics that must hold for a run to pass.

A rule compares a metric with a number or with another metric plus an offset:
    tuned.exact_match >= base.exact_match + 0.2
    tuned.exact_match >= few_shot.exact_match
    forgetting.drop <= 0.02
`SYSTEM.METRIC` refers to the first suite; `SUITE/SYSTEM.METRIC` to a named one. `forgetting.drop` is the
base pass rate on the forgetting probes minus the tuned one (and `forgetting.<category>_drop` per category).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError

_REF = r"[A-Za-z_][\w-]*(?:/[A-Za-z_][\w-]*)?\.[A-Za-z_]\w*"
_RULE = re.compile(rf"^\s*({_REF})\s*(>=|<=|>|<|==)\s*(?:({_REF})|(-?\d+(?:\.\d+)?))\s*(?:([+-])\s*(\d+(?:\.\d+)?))?\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


@dataclass
class RuleResult:
    rule: str
    passed: bool
    left: float
    right: float

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.rule}  ({self.left:.4f} vs {self.right:.4f})"


def check_syntax(rule: str) -> None:
    if not _RULE.match(rule):
        raise ConfigError(f"eval.gate: cannot read rule {rule!r}; write e.g. 'tuned.exact_match >= base.exact_match "
                          "+ 0.2' or 'forgetting.drop <= 0.02'")


def _lookup(ref: str, metrics: dict[str, Any]) -> float:
    head, _, metric = ref.rpartition(".")
    if head == "forgetting":
        table = metrics.get("forgetting") or {}
        if metric not in table:
            raise ConfigError(f"eval.gate: '{ref}' is not measured (forgetting probes off, or no such number)")
        return float(table[metric])
    suites = metrics["suites"]
    suite, _, system = head.rpartition("/")
    suite = suite or next(iter(suites))
    try:
        return float(suites[suite]["systems"][system][metric])
    except KeyError:
        raise ConfigError(f"eval.gate: '{ref}' was not measured (suites: {', '.join(suites)}; systems: "
                          f"{', '.join(suites[next(iter(suites))]['systems'])})") from None


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
