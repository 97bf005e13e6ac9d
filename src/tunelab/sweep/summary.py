"""The end of a sweep: rank the trials, pick the best one that meets every constraint, write best.yaml, and print
the table.

Best = the best objective among finished trials that meet every constraint (ties: lower final val loss, then
the earlier trial). A trial that breaks a constraint, was stopped early, or failed is never the best.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.artifacts import write_text_atomic
from tunelab.config_file import dump_config, validate_config
from tunelab.errors import TunelabError
from tunelab.sweep.goals import measure, rank_key
from tunelab.sweep.plan import SweepPlan, set_key
from tunelab.sweep.state import SweepState, TrialRecord

BEST_FILE = "best.yaml"
ORDER = {"finished": 0, "stopped": 1, "failed": 2, "running": 3, "pending": 4}


@dataclass
class SweepSummary:
    ranked: list[TrialRecord]  # best first: feasible finished, infeasible finished, stopped, failed, not run
    best: TrialRecord | None
    objective: str
    mode: str
    constraints: list[str]

    def problem(self) -> str | None:
        """Why the sweep has no answer yet (no best trial, or trials that did not run), or None."""
        unfinished = sum(t.status in ("pending", "running") for t in self.ranked)
        if unfinished:
            return (f"{unfinished} of {len(self.ranked)} trials did not run (the sweep was interrupted); "
                    "run the same command with --resume to finish them")
        if self.best is not None:
            return None
        finished = [t for t in self.ranked if t.status == "finished"]
        if not finished:
            return "no trial finished (see the failed and stopped trials above), so there is no best config"
        if all(t.objective is None for t in finished):
            return f"no finished trial measured {self.objective} as a number, so there is no best config"
        return f"no trial met every constraint ({'; '.join(self.constraints)}), so there is no best config"


def summarize(plan: SweepPlan, state: SweepState) -> SweepSummary:
    """Re-read every finished trial's eval/metrics.json (the truth, also after a resume) and rank them."""
    for record in state.trials:
        metrics = plan.root / record.name / "eval" / "metrics.json"
        if record.status == "finished" and metrics.is_file():
            try:
                outcome = measure(json.loads(metrics.read_text()), plan.objective, plan.constraints)
            except (TunelabError, ValueError) as err:
                record.status, record.error = "failed", f"its metrics cannot be read: {err}"
                continue
            record.objective, record.constraints, record.feasible = outcome.objective, outcome.rules, outcome.feasible
            if record.val_loss is None:
                record.val_loss = _final_val_loss(plan.root / record.name)
    state.save()

    def key(t: TrialRecord) -> tuple[Any, ...]:
        scored = t.status == "finished" and t.objective is not None
        group = (0 if t.feasible else 1) if scored else 2 + ORDER[t.status]
        inner = rank_key(t.objective, t.val_loss, t.index, plan.mode) if scored else (0.0, 0.0, t.index)
        return (group, *inner)

    ranked = sorted(state.trials, key=key)
    best = ranked[0] if ranked and ranked[0].status == "finished" and ranked[0].objective is not None \
        and ranked[0].feasible else None
    return SweepSummary(ranked, best, plan.objective, plan.mode, plan.constraints)


def _final_val_loss(run_dir: Path) -> float | None:
    try:
        value = json.loads((run_dir / "manifest.json").read_text())["train"]["val_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if value is not None else None


def write_best(plan: SweepPlan, summary: SweepSummary) -> Path | None:
    """best.yaml: the sweep's base config with the winning values, ready for `tunelab run` (its output.dir a
    sibling of the sweep folder). Removed when no trial qualifies, so a stale winner never lingers."""
    path = plan.root / BEST_FILE
    best = summary.best
    if best is None:
        path.unlink(missing_ok=True)
        return None
    raw = plan.cfg.model_dump(mode="json")
    for key, value in best.params.items():
        set_key(raw, key, value)
    raw.pop("sweep", None)
    raw["output"] = {"dir": str(plan.root.parent / f"{plan.root.name}-best"), "overwrite": False}
    cfg = validate_config(raw, source=str(path))
    values = ", ".join(f"{k}={v}" for k, v in best.params.items())
    head = (f"# The winning config of the sweep in {plan.root} ({best.name}: {values}).\n"
            f"# {plan.objective} = {best.objective:.6g} ({'higher' if plan.mode == 'max' else 'lower'} is better)"
            f"{'; meets every constraint' if plan.constraints else ''}. Its run folder: {plan.root / best.name}\n"
            f"# Train it again with: tunelab run {path}\n")
    write_text_atomic(path, head + dump_config(cfg))
    return path


def print_table(summary: SweepSummary, plan: SweepPlan, out: Console) -> None:
    better = "higher" if summary.mode == "max" else "lower"
    table = Table(title=f"tunelab sweep: {plan.root}  ({summary.objective}, {better} is better)")
    table.add_column("rank", justify="right")
    table.add_column("trial")
    for key in plan.space:
        table.add_column(key.rsplit(".", 1)[-1], justify="right")
    table.add_column("status")
    table.add_column("steps", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column(summary.objective, justify="right")
    for rule in summary.constraints:
        table.add_column(rule, justify="right")
    for position, t in enumerate(summary.ranked, 1):
        marker = "[bold green]*[/] " if t is summary.best else ""
        cells = [f"{marker}{position}", t.name, *(_cell(t.params.get(k)) for k in plan.space), _status(t),
                 "" if t.step is None else str(t.step), "" if t.val_loss is None else f"{t.val_loss:.4f}",
                 "" if t.objective is None else f"{t.objective:.4g}"]
        rules = {r["rule"]: r for r in t.constraints}
        for rule in summary.constraints:
            r = rules.get(rule.strip())
            cells.append("" if r is None else f"{'[green]ok' if r['passed'] else '[red]FAIL'}[/] {r['left']:.4g}")
        table.add_row(*cells, style="bold" if t is summary.best else None)
    out.print(table)
    for t in summary.ranked:  # errors are too long for a cell
        if t.status == "failed":
            out.print(f"[red]failed[/] {t.name}: {t.error or 'see its run folder'}", highlight=False)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _status(t: TrialRecord) -> str:
    colors = {"finished": "green", "stopped": "yellow", "failed": "red", "pending": "dim", "running": "dim"}
    return f"[{colors[t.status]}]{t.status}[/]"
