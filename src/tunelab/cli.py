"""The `tunelab` command: parse, load the RunConfig, call a stage function, print a summary.

Heavy libraries (torch, transformers) are imported inside the stages, so config errors and --dry-run
answer in a fraction of a second.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperOption
from typer.exceptions import TyperException

from tunelab import __version__
from tunelab.cli_common import ConfigArg, SetOpt, UriOpt, out, print_summary
from tunelab.cli_common import load as _load
from tunelab.cli_ship import export_app, export_combine, k8s_app, serve
from tunelab.cli_sweep import sweep
from tunelab.errors import ConfigError, TunelabError

_type_column = TyperOption.display_type_rich


def _no_type_on_flags(self: TyperOption, ctx: typer.Context) -> str | None:
    """Help's type column: a flag takes no value, so it shows none (typer would print `<bool>`)."""
    return None if self.is_flag else _type_column(self, ctx)


TyperOption.display_type_rich = _no_type_on_flags  # type: ignore[method-assign]

app = typer.Typer(
    help="tunelab: examples -> fine-tuned, evaluated model, driven by one YAML config.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Data preparation.", no_args_is_help=True)
app.add_typer(data_app, name="data")
registry_app = typer.Typer(help="The MLflow model registry: register, promote on evidence, list, show.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
runs_app = typer.Typer(help="Tracked runs: list, compare, sync buffered tracking.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(export_app, name="export")
app.add_typer(k8s_app, name="k8s")
app.command()(serve)
# Combining makes and evaluates a new run folder: a command of its own, not an export of one run.
app.command("combine")(export_combine)
app.command()(sweep)


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the config and data, check model and device; print the resolved config, then "
        "what was checked; load no weights.")] = False) -> None:
    """Prepare data, train, and evaluate base vs tuned, in one go."""
    from tunelab import pipeline
    from tunelab.config_file import dump_config

    cfg = _load(config, set_)
    if dry_run:
        checked = pipeline.preflight(cfg)  # before printing anything: a mistake is the only output
        out.print(dump_config(cfg), markup=False, highlight=False)
        _print_preflight(cfg, checked)  # last, where the terminal shows it
        return
    summary = pipeline.run_all(cfg)
    print_summary(summary.run.root, summary.train, summary.eval.metrics)
    if summary.registered is not None:
        _print_registered(summary.run.root, cfg.track.register_as, summary.registered, summary.new_version)
    gate_failed = _report_failed_gate(summary.eval.metrics)
    if summary.registry_error is not None:  # an error outranks the gate's exit status 1
        summary.registry_error.problems.append(f"the run and its eval are kept; once the store answers: tunelab "
                                               f"registry register {summary.run.root} --name {cfg.track.register_as}")
        raise summary.registry_error
    if gate_failed:
        sys.exit(1)


def _print_preflight(cfg: Any, checked: list[str] | None = None) -> None:
    from tunelab import pipeline

    for line in checked if checked is not None else pipeline.preflight(cfg):
        warning = line.startswith("warning: ")
        out.print(f"[yellow]warning:[/] {line[len('warning: '):]}" if warning else f"[green]ok[/] {line}")


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last complete checkpoint in output.dir.")] = False,
          dry_run: Annotated[bool, typer.Option(
              "--dry-run", help="Run the pre-flight checks training starts with (config, data, model, the device "
              "that trains: the workers' with Ray GPU workers), print what was found; load no weights.")] = False
          ) -> None:
    """Prepare data (if needed) and fine-tune an adapter into output.dir."""
    from tunelab import pipeline

    cfg = _load(config, set_)
    if dry_run:
        _print_preflight(cfg)
        return
    with pipeline.opened_run(cfg, starting_training=True, resume=resume) as run_paths:
        result = pipeline.stage_train(cfg, run_paths, resume=resume)
    print_summary(run_paths.root, result, None)


@app.command("eval")
def eval_(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS (or models:/NAME/VERSION).")],
          set_: SetOpt = None,
          max_examples: Annotated[int | None, typer.Option(
              help="A quick look: evaluate the first N examples of each suite into RUN_DIR/eval-sample/, leaving the "
              "run's own eval, manifest, MLflow run and registry alone.")] = None,
          judge_config: Annotated[Path | None, typer.Option(
              "--judge-config", help="A config of yours whose eval.judge scores the answers (or pass "
              "--set eval.judge.base_url=... --set eval.judge.model=...). A run's stored judge is never used.")] = None
          ) -> None:
    """Evaluate base, few-shot and tuned on every suite; writes RUN_DIR/eval/; exits 1 if the gate fails."""
    from tunelab import pipeline
    from tunelab.config_file import load_run_config
    from tunelab.registry import resolve_run_dir

    cfg, run_paths = load_run_config(resolve_run_dir(run_dir), set_)
    cfg.eval.judge = _callers_judge(set_ or [], judge_config)
    if max_examples is not None:
        if max_examples < 1:
            raise ConfigError(f"--max-examples {max_examples}: give a number of test examples, 1 or more")
        cfg.eval.max_examples = max_examples
        for suite in cfg.eval.suites:  # a suite's own limit would otherwise win over the quick look asked for
            suite.max_examples = min(suite.max_examples or max_examples, max_examples)
    sample = max_examples is not None
    result = pipeline.stage_eval(cfg, run_paths, sample=sample)
    print_summary(run_paths.root, None, result.metrics, sample=sample)
    _exit_on_failed_gate(result.metrics)


def _callers_judge(overrides: list[str], judge_config: Path | None) -> Any:
    """The LLM judge the caller chose now, or None. The judge receives this machine's API key (the variable
    api_key_env names) and the model's answers at base_url: a stored or registered run's config, written by
    someone else, must not choose either."""
    from tunelab.config_file import apply_overrides, validate_config

    mine = [o for o in overrides if o.split("=", 1)[0].strip().startswith(("eval.judge.", "eval.judge="))]
    raw: dict[str, Any] = {}
    if judge_config is not None:
        own = _load(judge_config, None).eval.judge
        if own is None:
            raise TunelabError(f"--judge-config {judge_config}: the config has no eval.judge")
        raw = {"eval": {"judge": own.model_dump()}}
    apply_overrides(raw, mine)
    judge = raw.get("eval", {}).get("judge")
    if not judge:
        return None
    return validate_config({"data": {"train": "unused.jsonl"}, "eval": {"judge": judge}},
                           source="--set eval.judge").eval.judge


@app.command()
def chat(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
         side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Answer with base and tuned.")] = False,
         max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 256) -> None:
    """Chat with the tuned model in the terminal (greedy decoding, the run's chat template)."""
    from tunelab.eval.terminal_chat import chat_loop
    from tunelab.registry import resolve_run_dir

    chat_loop(resolve_run_dir(run_dir), side_by_side, max_new_tokens)


@data_app.command("prep")
def data_prep(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate and split the data into output.dir/data."""
    from tunelab import pipeline

    cfg = _load(config, set_)
    with pipeline.opened_run(cfg, starting_training=False) as run_paths:
        prepared = pipeline.stage_data(cfg, run_paths, end_tracking=True)
    _print_data_summary(run_paths.data, prepared.report)




@registry_app.command("register")
def registry_register(run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
                      name: Annotated[str, typer.Option("--name", help="Registered model name.")]) -> None:
    """Register the run's adapter as a new model version (with base model, chat template, eval metrics)."""
    from tunelab.registry import register

    mv, new = register(run_dir, name)
    _print_registered(run_dir, name, mv, new)


def _print_registered(run_dir: Path, name: str, mv: Any, new: bool) -> None:
    from tunelab.track import GATE_PASSED_TAG

    if new:
        out.print(f"registered {name} version {mv.version} (gate passed: {mv.tags.get(GATE_PASSED_TAG)})")
    else:
        out.print(f"{run_dir} is already {name} version {mv.version}, with this adapter and eval; no new version "
                  f"(gate passed: {mv.tags.get(GATE_PASSED_TAG)})")


@registry_app.command("promote")
def registry_promote(name: str, version: str,
                     alias: Annotated[str, typer.Option("--alias", help="Alias to set, e.g. champion.")] = "champion",
                     force: Annotated[bool, typer.Option("--force", help="Promote even if the gate failed.")] = False,
                     reason: Annotated[str | None, typer.Option("--reason", help="Why, recorded with --force.")] = None,
                     tracking_uri: UriOpt = None) -> None:
    """Point ALIAS at VERSION, only if that version passed its eval gate (or with --force --reason)."""
    from tunelab.registry import default_tracking_uri, promote

    promote(name, version, alias, force, reason, tracking_uri or default_tracking_uri())
    out.print(f"{name}@{alias} -> version {version}")


@registry_app.command("list")
def registry_list(tracking_uri: UriOpt = None) -> None:
    """Registered models with their version counts and aliases."""
    from tunelab.registry import default_tracking_uri, list_models

    table = Table("model", "versions", "aliases", "base model")
    for m in list_models(tracking_uri or default_tracking_uri()):
        table.add_row(m["name"], str(m["versions"]), ", ".join(f"{a}->{v}" for a, v in m["aliases"].items()),
                      m["base_model"])
    out.print(table)


@registry_app.command("show")
def registry_show(name: str, tracking_uri: UriOpt = None) -> None:
    """Every version of NAME: aliases, gate result, forced promotions, eval metrics."""
    from tunelab.registry import default_tracking_uri, show

    table = Table("version", "aliases", "gate passed", "forced because", "metrics")
    for row in show(name, tracking_uri or default_tracking_uri()):
        metrics = ", ".join(f"{k[5:]}={v}" for k, v in sorted(row["metrics"].items()) if "exact_match" in k)
        table.add_row(row["version"], ", ".join(row["aliases"]), str(row["gate_passed"]), row["forced"] or "",
                      metrics)
    out.print(table)


@runs_app.command("list")
def runs_list(tracking_uri: UriOpt = None,
              experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "tunelab") -> None:
    """Tracked runs with their key numbers."""
    from tunelab.registry import default_tracking_uri
    from tunelab.runs import list_runs

    table = Table("run", "status", "method", "objective", "train loss", "tuned exact match", "gate")
    for r in list_runs(tracking_uri or default_tracking_uri(), experiment):
        table.add_row(r["name"], r["status"], r["method"], r["objective"], r["loss"], r["exact_match"], r["gate"])
    out.print(table)


@runs_app.command("compare")
def runs_compare(run_a: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                 run_b: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")]) -> None:
    """Metrics and config differences between two run folders."""
    from tunelab.progress import console
    from tunelab.registry import resolve_run_dir
    from tunelab.runs import compare

    folder_a, folder_b = resolve_run_dir(run_a), resolve_run_dir(run_b)  # run folders, or models:/ URIs
    metrics, config, mismatches = compare(folder_a, folder_b)
    table = Table("metric", folder_a.name, folder_b.name, "delta")
    for name, a, b in metrics:
        delta = f"{b - a:+.4g}" if isinstance(a, float) and isinstance(b, float) else ""
        table.add_row(name, _num(a), _num(b), delta)
    out.print(table)
    table = Table("config key", folder_a.name, folder_b.name)
    for key, a, b in config:
        table.add_row(key, str(a), str(b))
    out.print(table)
    for mismatch in mismatches:  # after the tables, where the eye ends up
        console.print(f"[yellow]warning:[/] {mismatch}")


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@runs_app.command("sync")
def runs_sync(run_dir: Path) -> None:
    """Upload tracking that was buffered while the MLflow server was away."""
    from tunelab.track import sync

    out.print(f"uploaded {sync(run_dir)} buffered tracking operations from {run_dir}")


@app.command()
def estimate(config: ConfigArg, set_: SetOpt = None,
             probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Time a few real training steps on this "
                                                 "machine (loads the model) to estimate time and cost.")] = True,
             gpu: Annotated[str | None, typer.Option(help="Estimate for this GPU (H100, A100-80G, L4, ...): memory "
                                                     "fit, and time from its bf16 throughput.")] = None,
             price_per_hour: Annotated[float | None, typer.Option(help="Your USD per hour, instead of the table's.")] = None,
             prices: Annotated[Path | None, typer.Option(help="YAML file of NAME: {memory_gib, bf16_tflops, "
                                                         "usd_per_hour} added to the price table.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Predict peak memory, time per run and cost of CONFIG before training it."""
    import json

    from tunelab.estimate import estimate_run
    from tunelab.estimate.render import print_estimate

    result = estimate_run(_load(config, set_), gpu=gpu, probe=probe, price_per_hour=price_per_hour,
                          prices_file=prices)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_estimate(result, out)


@app.command()
def version() -> None:
    """Print the tunelab version."""
    out.print(__version__)


def _print_data_summary(folder: Path, report: dict[str, Any]) -> None:
    table = Table(title=f"tunelab data: {folder}")
    table.add_column("step")
    table.add_column("rows", justify="right")
    table.add_row("loaded", str(report["loaded"]))
    table.add_row("skipped (bad rows)", str(report["skipped"]["count"]))
    for name, n in report["filters"].items():
        table.add_row(f"filter: {name}", str(n))
    table.add_row("exact duplicates", str(report["dedup"]["exact"]))
    table.add_row("near duplicates", str(report["dedup"]["near"]))
    if report["dedup"].get("conflicts"):
        table.add_row("conflicting verdicts", str(report["dedup"]["conflicts"]))
    contamination = report["contamination"]
    table.add_row(f"contaminated ({contamination['action']})", str(contamination["rows"]))
    if contamination.get("val_rows"):
        table.add_row(f"val rows overlapping test ({contamination['action']})", str(contamination["val_rows"]))
    for name, n in report["counts"].items():
        table.add_row(f"[bold]{name}[/]", f"[bold]{n}[/]")
    out.print(table)
    out.print(f"report: {folder / 'report.md'}")


def _exit_on_failed_gate(metrics: dict[str, Any]) -> None:
    if _report_failed_gate(metrics):
        sys.exit(1)


def _report_failed_gate(metrics: dict[str, Any]) -> bool:
    """Print each failed gate rule; whether any failed."""
    from tunelab.eval.gate import describe_failure
    from tunelab.eval.result import failed_rules

    failed = failed_rules(metrics.get("gate", []))
    for g in failed:
        print(f"gate failed: {describe_failure(g)}", file=sys.stderr)
    return bool(failed)


def _quiet_library_noise() -> None:
    """Silence, each by its own message, the libraries' notices that tunelab cannot act on and the user cannot fix
    (tunelab's own causes are fixed at the source: e.g. it names the MLflow dataset source it logs)."""
    # bitsandbytes tries to fetch an optional CPU kernel from a model hub at import and logs a warning when it
    # cannot (always, offline).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # PEFT's PeftModel and TRL's trainers read transformers' deprecated `is_gradient_checkpointing`.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main() -> None:
    _quiet_library_noise()
    try:
        code = app(standalone_mode=False)
    except TunelabError as err:
        from tunelab.redaction import redact_message

        for problem in err.problems:  # a message may quote an endpoint (a judge's, HF_ENDPOINT) or echo a key
            print(f"error: {redact_message(problem)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except TyperException as err:  # a usage mistake; typer carries its own click, whose errors are not click's
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # the file system refused a path the user gave (permissions, a full disk, a loop)
        if not err.filename:
            raise
        from tunelab.redaction import redact_message

        print(f"error: {redact_message(f'{err.filename}: {err.strerror or err}')}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
