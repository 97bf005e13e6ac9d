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

import click
import typer
from rich.console import Console
from rich.table import Table

from tunelab import __version__
from tunelab.errors import TunelabError

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
export_app = typer.Typer(help="Export a trained run for other consumers.", no_args_is_help=True)
app.add_typer(export_app, name="export")
k8s_app = typer.Typer(help="Kubernetes manifests: a KubeRay RayJob that trains, a KServe InferenceService that serves.",
                      no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")

out = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Path to the YAML run config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]


def _load(config: Path, overrides: list[str] | None) -> Any:
    from tunelab.config_file import load_config

    return load_config(config, overrides or [])


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the config and data, check model and device, print the resolved config; "
        "load no weights.")] = False) -> None:
    """Prepare data, train, and evaluate base vs tuned, in one go."""
    from tunelab import pipeline
    from tunelab.config_file import dump_config

    cfg = _load(config, set_)
    if dry_run:
        for line in pipeline.preflight(cfg):
            out.print(f"[green]ok[/] {line}")
        out.print(dump_config(cfg), markup=False, highlight=False)
        return
    summary = pipeline.run_all(cfg)
    _print_summary(summary.run.root, summary.train, summary.eval.metrics)
    _exit_on_failed_gate(summary.eval.metrics)


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last complete checkpoint in output.dir.")] = False) -> None:
    """Prepare data (if needed) and fine-tune an adapter into output.dir."""
    from tunelab import pipeline

    cfg = _load(config, set_)
    run_paths = pipeline.open_run(cfg, starting_training=True, resume=resume)
    result = pipeline.stage_train(cfg, run_paths, resume=resume)
    _print_summary(run_paths.root, result, None)


@app.command("eval")
def eval_(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS (or models:/NAME/VERSION).")],
          set_: SetOpt = None,
          max_examples: Annotated[int | None, typer.Option(help="Evaluate only the first N test examples.")] = None
          ) -> None:
    """Evaluate base, few-shot and tuned on every suite; writes RUN_DIR/eval/; exits 1 if the gate fails."""
    from tunelab import pipeline
    from tunelab.registry import resolve_run_dir

    cfg, run_paths = pipeline.load_run_config(resolve_run_dir(run_dir), set_)
    if max_examples:
        cfg.eval.max_examples = max_examples
    result = pipeline.stage_eval(cfg, run_paths)
    _print_summary(run_paths.root, None, result.metrics)
    _exit_on_failed_gate(result.metrics)


@app.command()
def chat(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
         side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Answer with base and tuned.")] = False,
         max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 256) -> None:
    """Chat with the tuned model in the terminal (greedy decoding, the run's chat template)."""
    from tunelab.eval.chat import chat_loop
    from tunelab.registry import resolve_run_dir

    chat_loop(resolve_run_dir(run_dir), side_by_side, max_new_tokens)


@data_app.command("prep")
def data_prep(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate and split the data into output.dir/data."""
    from tunelab import pipeline

    cfg = _load(config, set_)
    run_paths = pipeline.open_run(cfg, starting_training=False)
    prepared = pipeline.stage_data(cfg, run_paths)
    _print_data_summary(run_paths.data, prepared.report)


UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking/registry URI "
                                           "(default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db).")]


@registry_app.command("register")
def registry_register(run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
                      name: Annotated[str, typer.Option("--name", help="Registered model name.")]) -> None:
    """Register the run's adapter as a new model version (with base model, chat template, eval metrics)."""
    from tunelab.registry import register

    mv = register(run_dir, name)
    out.print(f"registered {name} version {mv.version} (gate passed: {mv.tags.get('tunelab.gate_passed')})")


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
def runs_compare(run_a: Path, run_b: Path) -> None:
    """Metrics and config differences between two run folders."""
    from tunelab.runs import compare

    metrics, config = compare(run_a, run_b)
    table = Table("metric", run_a.name, run_b.name, "delta")
    for name, a, b in metrics:
        delta = f"{b - a:+.4g}" if isinstance(a, float) and isinstance(b, float) else ""
        table.add_row(name, _num(a), _num(b), delta)
    out.print(table)
    table = Table("config key", run_a.name, run_b.name)
    for key, a, b in config:
        table.add_row(key, str(a), str(b))
    out.print(table)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@runs_app.command("sync")
def runs_sync(run_dir: Path) -> None:
    """Upload tracking that was buffered while the MLflow server was away."""
    from tunelab.track import sync

    out.print(f"uploaded {sync(run_dir)} buffered tracking operations from {run_dir}")


@export_app.command("merge")
def export_merge(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                 dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
                 out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/export/merged.")] = None,
                 max_diff: Annotated[float, typer.Option(help="Largest allowed logit difference.")] = 1e-3) -> None:
    """Merge the adapter into the base in float32, verify the logits, then cast and save a plain HF folder."""
    from tunelab import pipeline
    from tunelab.export.merge import ExportError, merge_run
    from tunelab.registry import resolve_run_dir

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    cfg, run = pipeline.load_run_config(resolve_run_dir(run_dir))
    result = merge_run(cfg, run, out_dir or run.root / "export" / "merged", dtype, max_diff)
    out.print(f"wrote {result.folder} ({result.dtype}); merged vs adapter max logit diff {result.max_diff:.2e}, "
              f"reloaded {result.reload_diff:.2e}")


@export_app.command("gguf")
def export_gguf(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                quant: Annotated[str, typer.Option(help="f16, q8_0 or q4_k_m (adapter-only: f16 or q8_0).")] = "q8_0",
                out_dir: Annotated[Path | None, typer.Option(
                    "--out", help="Default: RUN_DIR/export/gguf-QUANT (adapter-only: gguf-lora-QUANT).")] = None,
                adapter_only: Annotated[bool, typer.Option(
                    "--adapter-only", help="Only the LoRA adapter, as a GGUF LoRA for a base GGUF.")] = False,
                modelfile: Annotated[bool, typer.Option(help="Write an Ollama Modelfile.")] = True) -> None:
    """A GGUF for llama.cpp / Ollama, made and quantized by llama.cpp's tools, checked in llama.cpp."""
    from tunelab import pipeline
    from tunelab.export.gguf import export_gguf as run_export
    from tunelab.registry import resolve_run_dir

    cfg, run = pipeline.load_run_config(resolve_run_dir(run_dir))
    default = run.root / "export" / (f"gguf-lora-{quant}" if adapter_only else f"gguf-{quant}")
    result = run_export(cfg, run, quant, out_dir or default, adapter_only, modelfile)
    v = result.verification
    out.print(f"wrote {result.gguf} ({v['bytes'] / 2**20:.1f} MiB) in {result.seconds:.0f} s; llama.cpp vs "
              f"transformers: {v['exact_continuations']}/{v['prompts']} identical greedy continuations, top-1 "
              f"agreement {v['top1_agreement']:.1%}")


@export_app.command("int4")
def export_int4(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/export/int4.")] = None
                ) -> None:
    """The merged model in bitsandbytes 4-bit NF4, for transformers and vLLM, compared with float32."""
    from tunelab import pipeline
    from tunelab.export.int4 import export_int4 as run_export
    from tunelab.registry import resolve_run_dir

    cfg, run = pipeline.load_run_config(resolve_run_dir(run_dir))
    result = run_export(cfg, run, out_dir or run.root / "export" / "int4")
    r = result.report
    out.print(f"wrote {result.folder} ({r['weights_bytes'] / 2**20:.1f} MiB of weights); vs float32: "
              f"{r['exact_continuations']}/{r['prompts']} identical greedy continuations, top-1 agreement "
              f"{r['top1_agreement']:.1%}")


@export_app.command("combine")
def export_combine(run_dirs: Annotated[list[str], typer.Argument(help="Two or more run folders (or models:/ URIs).")],
                   out_dir: Annotated[Path, typer.Option("--out", help="The new run folder for the combined adapter.")],
                   how: Annotated[str, typer.Option(help="linear, cat, ties, dare (= dare_ties) or dare_linear.")
                                  ] = "linear",
                   weights: Annotated[str | None, typer.Option(help="Comma-separated, one per run; default equal.")
                                      ] = None,
                   density: Annotated[float | None, typer.Option(
                       help="ties/dare: fraction of each update kept (default 0.5).")] = None,
                   evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate the blend.")] = True
                   ) -> None:
    """Blend LoRA adapters trained on one base into one adapter (PEFT add_weighted_adapter), as a run folder."""
    from tunelab import pipeline
    from tunelab.export.combine import HOW, NEEDS_DENSITY, combine_runs, load_source
    from tunelab.export.merge import ExportError
    from tunelab.registry import resolve_run_dir

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else [1.0 / len(run_dirs)] * len(run_dirs)
    except ValueError:
        raise ExportError(f"--weights: expected comma-separated numbers, got {weights!r}") from None
    if density is None and HOW.get(how) in NEEDS_DENSITY:
        density = 0.5
    sources = [load_source(*pipeline.load_run_config(resolve_run_dir(d))) for d in run_dirs]
    run = combine_runs(sources, how, parsed, out_dir, density)
    out.print(f"wrote the combined run {run.root}")
    if evaluate:
        cfg, run = pipeline.load_run_config(run.root)
        result = pipeline.stage_eval(cfg, run)
        _print_summary(run.root, None, result.metrics)


@app.command()
def serve(
    adapters: Annotated[list[str] | None, typer.Argument(
        help="LoRA runs to serve: a run folder or models:/NAME@ALIAS, optionally named NAME=RUN.")] = None,
    base: Annotated[str | None, typer.Option(
        help="Base model name or folder; default: the base the first adapter was trained on.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "TUNELAB_API_KEY",
    allow_root: Annotated[list[Path] | None, typer.Option(
        help="Folder admin-loaded adapters may come from (repeatable); default: ./runs and the given runs' "
        "folders.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together in one batch.")] = 16,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before new ones get 429.")] = 64,
    request_timeout: Annotated[float, typer.Option(min=1, help="Seconds before a request is abandoned.")] = 120.0,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights dtype: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16.")] = "auto",
    tracking_uri: UriOpt = None,
    engine: Annotated[str, typer.Option(help="hf (this server) or vllm (print the equivalent vLLM command).")] = "hf",
    launch: Annotated[bool, typer.Option(help="With --engine vllm: run the command instead of printing it.")] = False,
) -> None:
    """Serve the base model and many LoRA adapters behind an OpenAI-compatible API (plus a playground at /)."""
    from tunelab.serve.server import ServeOptions, launch_vllm, printable, vllm_command
    from tunelab.serve.server import serve as run_server

    if engine not in ("hf", "vllm"):
        raise TunelabError(f"--engine {engine}: choose hf or vllm")
    options = ServeOptions(
        adapters=adapters or [], base=base, host=host, port=port, api_key_env=api_key_env,
        allow_roots=allow_root or [], max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout,
        max_tokens_limit=max_tokens_limit, device=device, dtype=dtype, tracking_uri=tracking_uri,
    )
    if engine == "vllm":
        command, notes = vllm_command(options)
        for note in notes:
            print(note, file=sys.stderr)
        if launch:
            launch_vllm(command, options)
        print(printable(command))
        return
    run_server(options)


OutFileOpt = Annotated[Path | None, typer.Option("--out", help="Write the YAML here instead of to stdout.")]


@k8s_app.command("rayjob")
def k8s_rayjob(config: ConfigArg, set_: SetOpt = None, out_file: OutFileOpt = None) -> None:
    """A ConfigMap with the run config and a KubeRay RayJob running `tunelab train` on it (cluster.*, k8s.*)."""
    from tunelab.cluster.k8s import dump_yaml, job_config, rayjob_manifests
    from tunelab.config_file import dump_config

    job = job_config(_load(config, set_))
    _emit(dump_yaml(rayjob_manifests(job, dump_config(job))), out_file)


@k8s_app.command("kserve")
def k8s_kserve(names: Annotated[list[str], typer.Argument(help="Registered adapters: NAME (its champion), "
                                                         "models:/NAME@ALIAS or models:/NAME/VERSION.")],
               config: Annotated[Path | None, typer.Option("--config", help="Run config whose k8s section to use "
                                                           "(default: the first adapter's run config).")] = None,
               service: Annotated[str | None, typer.Option("--name", help="InferenceService name "
                                                           "(default: the first adapter's name).")] = None,
               base_uri: Annotated[str | None, typer.Option("--base-uri", help="Where the serving pod downloads "
                                                            "the base model (hf://, s3://, pvc://).")] = None,
               runtime: Annotated[str | None, typer.Option("--runtime", help="ServingRuntime name; default: "
                                                           "KServe picks the one for the huggingface format.")] = None,
               tracking_uri: UriOpt = None, out_file: OutFileOpt = None) -> None:
    """A KServe InferenceService serving the base model on vLLM with the registered LoRA adapters."""
    from tunelab import pipeline
    from tunelab.cluster.k8s import adapter_reference, dump_yaml, inference_service
    from tunelab.registry import default_tracking_uri, lookup_version, resolve_run_dir

    uri = tracking_uri or default_tracking_uri()
    refs = [adapter_reference(n) for n in names]
    versions = [lookup_version(ref, uri) for ref in refs]
    adapters = [(mv.name if sum(v.name == mv.name for v in versions) == 1 else f"{mv.name}-v{mv.version}", mv)
                for mv in versions]
    cfg = _load(config, None) if config else pipeline.load_run_config(resolve_run_dir(refs[0], uri))[0]
    rank = max((_adapter_rank(mv, uri) for mv in versions), default=None)
    manifest = inference_service(cfg, service or versions[0].name, adapters, base_uri, runtime, rank)
    _emit(dump_yaml([manifest]), out_file)


def _adapter_rank(mv: Any, uri: str) -> int:
    """The LoRA rank of a registered adapter: vLLM refuses adapters above --max-lora-rank (default 16)."""
    import json

    from tunelab.registry import resolve_run_dir

    folder = resolve_run_dir(f"models:/{mv.name}/{mv.version}", uri)
    return int(json.loads((folder / "adapter" / "adapter_config.json").read_text()).get("r") or 0)


def _emit(text: str, out_file: Path | None) -> None:
    if out_file is None:
        print(text, end="")
        return
    from tunelab.artifacts import write_text_atomic

    write_text_atomic(out_file, text)
    out.print(f"wrote {out_file}")


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
    contamination = report["contamination"]
    table.add_row(f"contaminated ({contamination['action']})", str(contamination["rows"]))
    for name, n in report["counts"].items():
        table.add_row(f"[bold]{name}[/]", f"[bold]{n}[/]")
    out.print(table)
    out.print(f"report: {folder / 'report.md'}")


def _print_summary(root: Path, train_result: Any, metrics: dict[str, Any] | None) -> None:
    table = Table(title=f"tunelab run: {root}", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    if train_result is not None:
        t = train_result
        table.add_row("train steps", str(t.steps))
        table.add_row("train loss first -> last", f"{t.first_loss:.4f} -> {t.last_loss:.4f}")
        table.add_row("val loss", f"{t.val_loss:.4f}")
        table.add_row("train time", f"{t.train_seconds:.1f} s")
        table.add_row("train tokens/s", f"{t.tokens_per_second:.0f}")
        table.add_row("peak memory", f"{t.peak_memory_mb:.0f} MiB")
    if metrics is not None:
        for suite, result in metrics["suites"].items():
            for system, values in result["systems"].items():
                for metric in ("exact_match", "pairwise_accuracy", "contains", "eval_loss", "mean_words"):
                    if metric in values:
                        shown = f"{values[metric]:.4f}" if metric in ("eval_loss", "mean_words") else f"{values[metric]:.1%}"
                        table.add_row(f"{suite} {system} {metric} (n={result['n_examples']})", shown)
        forgetting = metrics.get("forgetting") or {}
        if "drop" in forgetting:
            table.add_row("forgetting probes base -> tuned",
                          f"{forgetting['base']['overall']:.0%} -> {forgetting['tuned']['overall']:.0%}")
        for rule in metrics.get("gate", []):
            verdict = "[green]PASS[/]" if rule["passed"] else "[red]FAIL[/]"
            table.add_row(f"gate: {rule['rule']}", f"{verdict} ({rule['left']:.3f} vs {rule['right']:.3f})")
        if (root / "eval" / "report.html").is_file():
            table.add_row("report", str(root / "eval" / "report.html"))
    out.print(table)


def _exit_on_failed_gate(metrics: dict[str, Any]) -> None:
    failed = [g for g in metrics.get("gate", []) if not g["passed"]]
    for g in failed:
        print(f"gate failed: {g['rule']} (measured {g['left']:.4f}, needed {g['right']:.4f})", file=sys.stderr)
    if failed:
        sys.exit(1)


def _quiet_library_noise() -> None:
    # bitsandbytes tries to fetch an optional CPU kernel from a model hub at import and logs a warning when it
    # cannot (always, offline); deprecation notices about the libraries' own internals are not the user's to fix.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating tables...) are noise here
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")


def main() -> None:
    _quiet_library_noise()
    try:
        code = app(standalone_mode=False)
    except TunelabError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(err.exit_code)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
