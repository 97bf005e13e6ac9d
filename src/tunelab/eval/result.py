"""What the eval stage returns, and the gate as metrics.json records it: one definition for every kind of run
(generation suites in eval/run.py, reward models in eval/reward.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError
from tunelab.eval.gate import evaluate_gate


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def gate_passed(self) -> bool:
        return all(rule["passed"] for rule in self.metrics.get("gate", []))


def gate_rows(rules: list[str], metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], ConfigError | None]:
    """The gate's rows for metrics.json, and the error of a rule that names an unmeasured number (the gate is
    then empty). The caller writes the measured numbers first and raises the error after: an eval is never
    lost to a typo in a gate rule."""
    try:
        gate = evaluate_gate(rules, metrics)
    except ConfigError as err:
        return [], err
    return [{"rule": g.rule, "passed": g.passed, "left": g.left, "right": g.right} for g in gate], None
