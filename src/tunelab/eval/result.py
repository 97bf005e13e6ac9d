"""What the eval stage returns, and the gate as metrics.json records it: one definition for every kind of run
(generation suites in eval/run.py, reward models in eval/reward_accuracy.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError
from tunelab.eval.gate import RuleResult, evaluate_gate


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def gate_passed(self) -> bool:
        return gate_passed(self.metrics)


def failed_rules(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule rows ({rule, passed, left, right}) that did not hold."""
    return [row for row in rows if not row["passed"]]


def gate_passed(metrics: dict[str, Any]) -> bool:
    """Whether an eval's gate passed: every rule in its metrics.json held (a gate without rules passes). The CLI's
    exit code, the tracked run, the registry and promotion all start from it; for the registry and promotion a
    gate without rules is no evidence (track.gate_tags)."""
    return not failed_rules(metrics.get("gate", []))


def rule_rows(results: list[RuleResult]) -> list[dict[str, Any]]:
    """Rule verdicts as metrics.json (and a sweep's constraints) record them."""
    return [{"rule": r.rule, "passed": r.passed, "left": r.left, "right": r.right} for r in results]


def gate_rows(rules: list[str], metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], ConfigError | None]:
    """The gate's rows for metrics.json, and the error of the rules that name an unmeasured number. Such a rule
    is a failed row (it is no evidence), never dropped: a gate whose rules cannot be read must not pass. The
    caller writes the measured numbers first and raises the error after: an eval is never lost to a typo."""
    rows, problems = [], []
    for rule in rules:
        try:
            rows += rule_rows(evaluate_gate([rule], metrics))
        except ConfigError as err:
            problems += err.problems
            rows.append({"rule": rule, "passed": False, "left": None, "right": None, "error": "; ".join(err.problems)})
    return rows, ConfigError(*problems) if problems else None
