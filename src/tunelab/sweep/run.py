"""The sweep stage: plan, open the sweep folder, run what is pending, rank, write sweep.html and best.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import write_text_atomic
from tunelab.config import RunConfig
from tunelab.sweep.plan import Flags, SweepPlan, build_plan, merge_flags
from tunelab.sweep.state import SweepState
from tunelab.sweep.summary import SweepSummary

__all__ = ["Flags", "SweepOutcome", "plan_sweep", "run_sweep"]


@dataclass
class SweepOutcome:
    plan: SweepPlan
    summary: SweepSummary
    html: Path
    best: Path | None


def plan_sweep(cfg: RunConfig, flags: Flags, resume: bool = False) -> SweepPlan:
    """The checked plan: `cfg` with the flags applied to its sweep section (on --resume, to the sweep section
    the sweep started with, recorded in sweep.json)."""
    from tunelab.sweep.folder import resumable_config

    if resume:
        cfg = resumable_config(cfg, Path(cfg.output.dir))
    cfg, origin = merge_flags(cfg, flags)
    flag_keys = {flag.partition("=")[0].strip() for flag in flags.params}
    return build_plan(cfg, origin, flag_keys)


def run_sweep(plan: SweepPlan, resume: bool = False, retry_failed: bool = False) -> SweepOutcome:
    """Run the trials still to run, then rank them and write sweep.html and best.yaml into the sweep folder."""
    from tunelab.sweep.folder import finish_replacement, open_sweep, start_sweep
    from tunelab.sweep.html import render_sweep_html
    from tunelab.sweep.runner import run_pending
    from tunelab.sweep.summary import summarize, write_best
    from tunelab.sweep.tracking import close_parent, open_parent

    state = open_sweep(plan, resume, retry_failed)
    start_sweep(plan, state)
    state.parent_run_id = open_parent(plan.cfg, plan.root, state.parent_run_id, plan.spec())
    state.save()
    run_pending(plan, state)
    summary = summarize(plan, state)
    html = plan.root / "sweep.html"
    write_text_atomic(html, render_sweep_html(plan, summary))
    best = write_best(plan, summary)
    close_parent(plan.cfg, state.parent_run_id, _parent_summary(summary, state),
                 [html, state.path, *([best] if best else [])])
    finish_replacement(plan.root, state)
    return SweepOutcome(plan, summary, html, best)


def _parent_summary(summary: SweepSummary, state: SweepState) -> dict[str, Any]:
    counts = state.counts()
    metrics = {f"trials_{status}": n for status, n in counts.items()}
    tags = {"tunelab.sweep_objective": summary.objective}
    if summary.best is not None:
        metrics[f"best.{summary.objective}"] = summary.best.objective
        tags["tunelab.best_trial"] = summary.best.name
    return {"metrics": metrics, "tags": tags}
