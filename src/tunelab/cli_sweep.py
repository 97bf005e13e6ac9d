"""`tunelab sweep`: a hyperparameter search over a config, each trial an ordinary run folder."""

from __future__ import annotations

import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tunelab.cli_common import ConfigArg, SetOpt, out
from tunelab.cli_common import load as _load

if TYPE_CHECKING:
    from tunelab.sweep.plan import SweepPlan


class Search(str, Enum):
    grid = "grid"
    random = "random"


class Mode(str, Enum):
    max = "max"
    min = "min"


def sweep(
    config: ConfigArg,
    set_: SetOpt = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A config key to search: KEY=v1,v2,... or KEY=loguniform(a,b) (also uniform, randint); "
        "repeatable; adds to or replaces the config's sweep.params.")] = None,
    samples: Annotated[int | None, typer.Option(
        "--samples", min=1, help="Random search: how many trials to draw (default 10).")] = None,
    search: Annotated[Search | None, typer.Option(
        "--search", help="grid (every combination of value lists) or random; default: grid when every key is a "
        "list.")] = None,
    objective: Annotated[str | None, typer.Option(
        "--objective", help="The metric to optimize, as in eval.gate rules: tuned.exact_match, "
        "test/tuned.token_f1, forgetting.drop ...")] = None,
    mode: Annotated[Mode | None, typer.Option(
        "--mode", help="max or min; default: min for losses and drops, max otherwise.")] = None,
    constraint: Annotated[list[str] | None, typer.Option(
        "--constraint", help="An eval.gate rule the winner must meet, e.g. 'forgetting.drop <= 0.03' "
        "(repeatable; replaces sweep.constraints).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(
        "--max-concurrent", min=1, help="Trials running at once (default: as many as the cluster fits).")] = None,
    early_stopping: Annotated[bool | None, typer.Option(
        "--early-stopping/--no-early-stopping", help="ASHA on val loss (needs train.eval_steps); default: on when "
        "train.eval_steps is set.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish a killed sweep in output.dir: trials that ended are kept, the rest run.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="With --resume: run failed trials again too.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the sweep and print its trials; run nothing.")] = False,
) -> None:
    """Search hyperparameters on Ray Tune; writes OUTPUT_DIR/sweep.html and best.yaml; exits 1 if no trial
    finished meeting every constraint."""
    from tunelab.errors import TunelabError
    from tunelab.sweep.plan import Flags
    from tunelab.sweep.run import plan_sweep, run_sweep
    from tunelab.sweep.summary import print_table

    if retry_failed and not resume:
        raise TunelabError("--retry-failed goes with --resume")
    flags = Flags(params=param or [], samples=samples, search=search.value if search else None, objective=objective,
                  mode=mode.value if mode else None,
                  constraints=constraint or [], max_concurrent=max_concurrent, early_stopping=early_stopping)
    plan = plan_sweep(_load(config, set_), flags, resume=resume)
    if dry_run:
        _print_plan(plan)
        return
    outcome = run_sweep(plan, resume=resume, retry_failed=retry_failed)
    print_table(outcome.summary, plan, out)
    out.print(f"sweep report: {outcome.html}")
    if outcome.best is not None:
        out.print(f"best config: {outcome.best}")
    problem = outcome.summary.problem()
    if problem:
        print(f"sweep: {problem}", file=sys.stderr)
        sys.exit(1)


def _print_plan(plan: SweepPlan) -> None:
    from tunelab.sweep.space import describe_space

    better = "higher" if plan.mode == "max" else "lower"
    space = ", ".join(f"{k} in {v}" for k, v in describe_space(plan.space).items())
    out.print(f"[green]ok[/] {plan.search} search over {space}")
    out.print(f"[green]ok[/] objective {plan.objective} ({better} is better)"
              + (f"; constraints: {'; '.join(plan.constraints)}" if plan.constraints else ""))
    out.print("[green]ok[/] early stopping: " + (f"ASHA on val loss from step {plan.grace_steps}, reduction factor "
              f"{plan.cfg.sweep.reduction_factor:g}" if plan.early_stopping else "off"))
    table = Table(title=f"{len(plan.trials)} trials in {plan.root}")
    table.add_column("trial")
    for key in plan.space:
        table.add_column(key, justify="right")
    for t in plan.trials:
        table.add_row(t.name, *(str(t.params[k]) for k in plan.space))
    out.print(table)
