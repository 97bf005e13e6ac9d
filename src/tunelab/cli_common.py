"""What every `tunelab` command module shares: the console, the config argument, the --set and
--tracking-uri options, and the run summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunelab.artifacts import RunPaths
from tunelab.eval.report import format_metric

out = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Path to the YAML run config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking/registry URI "
                                           "(default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db).")]


def load(config: Path, overrides: list[str] | None) -> Any:
    from tunelab.config_file import load_config

    return load_config(config, overrides or [])


def print_summary(root: Path, train_result: Any, metrics: dict[str, Any] | None, sample: bool = False) -> None:
    """The table `run`, `train`, `eval` and `combine` end with: training figures, eval metrics, gate (`sample`: of a
    quick eval in eval-sample/, said to be one)."""
    table = Table(title=f"run folder: {root}", show_header=True)  # run, train, eval, combine all end here
    table.add_column("measure")
    table.add_column("value", justify="right", overflow="fold")
    if train_result is not None:
        t = train_result
        table.add_row("train steps", str(t.steps))
        table.add_row("train loss first -> last", f"{t.first_loss:.4f} -> {t.last_loss:.4f}")
        table.add_row("val loss", f"{t.val_loss:.4f}" if t.val_loss == t.val_loss else "- (no val split)")
        table.add_row("train time", f"{t.train_seconds:.1f} s")
        table.add_row("train tokens/s", f"{t.tokens_per_second:.0f}")
        table.add_row("peak memory", f"{t.peak_memory_mb:.0f} MiB")
        table.add_row("chat template", t.chat_template)
    if metrics is not None:
        for suite, result in metrics["suites"].items():
            for system, values in result["systems"].items():
                for metric, value in values.items():  # every metric the suite computed, as report.md shows them
                    table.add_row(f"{suite} {system} {metric} (n={result['n_examples']})", format_metric(value, metric))
        forgetting = metrics.get("forgetting") or {}
        if "drop" in forgetting:
            table.add_row("forgetting probes base -> tuned",
                          f"{forgetting['base']['overall']:.0%} -> {forgetting['tuned']['overall']:.0%}")
        for task, scores in ((metrics.get("harness") or {}).get("tasks") or {}).items():
            if "drop" in scores:
                table.add_row(f"{task} {scores['metric'].removesuffix(',none')} base -> tuned (n={scores['n']})",
                              f"{scores['base']:.4f} -> {scores['tuned']:.4f}")
        for rule in metrics.get("gate", []):
            verdict = "[green]PASS[/]" if rule["passed"] else "[red]FAIL[/]"
            measured = f"{rule['left']:.3f} vs {rule['right']:.3f}" if rule.get("left") is not None else "not measured"
            table.add_row(f"gate: {rule['rule']}", f"{verdict} ({measured})")
    out.print(table)
    run = RunPaths(root)
    report = (run.eval_sample if sample else run.eval) / "report.html"
    if metrics is not None and report.is_file():
        out.print(f"report: {report}", soft_wrap=True, highlight=False)  # whole on one line, to copy; never cut
    if sample:
        out.print(f"a sample eval (--max-examples), not the run's evidence: {run.eval}, the manifest, MLflow and the "
                  "registry are unchanged", soft_wrap=True, highlight=False)
