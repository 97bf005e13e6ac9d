"""`tunelab export`, `tunelab serve` and `tunelab k8s`: the commands that ship a trained run to its consumers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tunelab.cli_common import ConfigArg, SetOpt, UriOpt, out, print_summary
from tunelab.cli_common import load as _load
from tunelab.errors import ExportError, TunelabError

export_app = typer.Typer(help="Export a trained run for other consumers.", no_args_is_help=True)
k8s_app = typer.Typer(help="Kubernetes manifests: a KubeRay RayJob that trains, a KServe InferenceService that serves.",
                      no_args_is_help=True)


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty --out folder.")]


def _export_source(run_dir: str, out_dir: Path | None, overwrite: bool) -> tuple[Any, Any]:
    """The run an export reads (a folder or a registry URI), with --out checked before any work."""
    from tunelab.artifacts import trained_weights_problem
    from tunelab.config_file import load_run_config
    from tunelab.errors import ExportError
    from tunelab.export.merge import check_out
    from tunelab.registry import resolve_run_dir

    cfg, run = load_run_config(resolve_run_dir(run_dir))
    if run.is_trained and (problem := trained_weights_problem(run)):
        raise ExportError(f"{run.root}: its trained weights cannot be loaded: {problem}; train it again")
    if out_dir is not None:
        local_base = Path(cfg.model.name).expanduser()
        check_out(out_dir, run, overwrite, local_base if local_base.is_dir() else None)
    return cfg, run


def _warn_without_evidence(name: str, run: Any) -> None:
    """Exporting is the user's call, but shipping a run whose eval failed (or never ran) should be a choice made
    knowingly: `registry promote` refuses such a version, so an export says so too, under what it wrote."""
    import json

    from tunelab.artifacts import sha256_folder
    from tunelab.eval.gate import describe_failure
    from tunelab.eval.result import failed_rules
    from tunelab.progress import console

    path = run.eval / "metrics.json"
    if not path.is_file():
        console.print(f"[yellow]warning:[/] {name} was never evaluated: there is no evidence it beats its base "
                      "(tunelab eval RUN)")
        return
    measured = json.loads(path.read_text())
    if measured.get("trained_sha256") and measured["trained_sha256"] != sha256_folder(run.trained):
        console.print(f"[yellow]warning:[/] {name} changed after it was evaluated (trained further, or its weights "
                      "replaced): its eval evidence is for other weights (tunelab eval RUN)")
        return
    for g in failed_rules(measured.get("gate", [])):
        console.print(f"[yellow]warning:[/] {name} failed its eval gate: {describe_failure(g)}; exported anyway")


@export_app.command("merge")
def export_merge(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                 dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
                 out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/export/merged.")] = None,
                 max_diff: Annotated[float, typer.Option(help="Largest allowed logit difference.")] = 1e-3,
                 overwrite: OverwriteOpt = False) -> None:
    """Merge the adapter into the base in float32, verify the logits, then cast and save a plain HF folder."""
    from tunelab import pipeline
    from tunelab.export.merge import merge_run

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    cfg, run = _export_source(run_dir, out_dir, overwrite)
    result = merge_run(cfg, run, out_dir or run.root / "export" / "merged", dtype, max_diff)
    pipeline.log_export(cfg, run, result.folder, result.folder / "tunelab_export.json")
    out.print(f"wrote {result.folder} ({result.dtype}); merged vs adapter max logit diff {result.max_diff:.2e}, "
              f"reloaded {result.reload_diff:.2e}")
    _warn_without_evidence(run_dir, run)


@export_app.command("gguf")
def export_gguf(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                quant: Annotated[str, typer.Option(help="f16, q8_0 or q4_k_m (adapter-only: f16 or q8_0).")] = "q8_0",
                out_dir: Annotated[Path | None, typer.Option(
                    "--out", help="Default: RUN_DIR/export/gguf-QUANT (adapter-only: gguf-lora-QUANT).")] = None,
                adapter_only: Annotated[bool, typer.Option(
                    "--adapter-only", help="Only the LoRA adapter, as a GGUF LoRA for a base GGUF.")] = False,
                modelfile: Annotated[bool, typer.Option(help="Write an Ollama Modelfile.")] = True,
                overwrite: OverwriteOpt = False) -> None:
    """A GGUF for llama.cpp / Ollama, made and quantized by llama.cpp's tools, checked in llama.cpp."""
    from tunelab import pipeline
    from tunelab.export.gguf import export_gguf as run_export

    cfg, run = _export_source(run_dir, out_dir, overwrite)
    default = run.root / "export" / (f"gguf-lora-{quant}" if adapter_only else f"gguf-{quant}")
    result = run_export(cfg, run, quant, out_dir or default, adapter_only, modelfile)
    pipeline.log_export(cfg, run, result.folder, result.folder / "verification.json")
    v = result.verification
    out.print(f"wrote {result.gguf} ({v['bytes'] / 2**20:.1f} MiB) in {result.seconds:.0f} s; llama.cpp vs "
              f"transformers: {v['exact_continuations']}/{v['prompts']} identical greedy continuations, top-1 "
              f"agreement {v['top1_agreement']:.1%}")
    _warn_without_evidence(run_dir, run)


@export_app.command("int4")
def export_int4(run_dir: Annotated[str, typer.Argument(help="A run folder, or models:/NAME@ALIAS.")],
                out_dir: Annotated[Path | None, typer.Option("--out", help="Default: RUN_DIR/export/int4.")] = None,
                overwrite: OverwriteOpt = False) -> None:
    """The merged model in bitsandbytes 4-bit NF4, for transformers and vLLM, compared with float32."""
    from tunelab import pipeline
    from tunelab.export.int4 import export_int4 as run_export

    cfg, run = _export_source(run_dir, out_dir, overwrite)
    result = run_export(cfg, run, out_dir or run.root / "export" / "int4")
    pipeline.log_export(cfg, run, result.folder, result.folder / "tunelab_export.json")
    r = result.report
    out.print(f"wrote {result.folder} ({r['weights_bytes'] / 2**20:.1f} MiB of weights); vs float32: "
              f"{r['exact_continuations']}/{r['prompts']} identical greedy continuations, top-1 agreement "
              f"{r['top1_agreement']:.1%}")
    _warn_without_evidence(run_dir, run)


@export_app.command("combine", hidden=True)  # the old spelling; `tunelab combine` is the command
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
    from tunelab.config_file import load_run_config
    from tunelab.export.combine import HOW, NEEDS_DENSITY, combine_runs, load_source
    from tunelab.registry import resolve_run_dir

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else [1.0 / len(run_dirs)] * len(run_dirs)
    except ValueError:
        raise ExportError(f"--weights: expected comma-separated numbers, got {weights!r}") from None
    if density is None and HOW.get(how) in NEEDS_DENSITY:
        density = 0.5
    sources = [load_source(*load_run_config(resolve_run_dir(d))) for d in run_dirs]
    run = combine_runs(sources, how, parsed, out_dir, density)
    out.print(f"wrote the combined run {run.root}")
    if evaluate:
        cfg, run = load_run_config(run.root)
        cfg.eval.judge = None  # the sources' stored judges are someone else's choice (see `tunelab eval`)
        result = pipeline.stage_eval(cfg, run)
        print_summary(run.root, None, result.metrics)


def serve(
    adapters: Annotated[list[str] | None, typer.Argument(
        help="LoRA runs to serve: a run folder or models:/NAME@ALIAS, optionally named NAME=RUN.")] = None,
    base: Annotated[str | None, typer.Option(
        help="Base model name or folder; default: the base the first adapter was trained on.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "TUNELAB_API_KEY",
    admin_key_env: Annotated[str, typer.Option(
        help="Environment variable holding the admin key for /admin/*; unset: no admin endpoints.")] = "TUNELAB_ADMIN_KEY",
    allow_root: Annotated[list[str] | None, typer.Option(
        help="Folder admin-loaded adapters may come from, or models:/NAME (models:/ for any registered model); "
        "repeatable; default: ./runs, the given runs' folders and registered models.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together in one batch.")] = 16,
    batching: Annotated[str, typer.Option(
        help="continuous (requests join and leave the batch at each decode step) or static (whole batches).",
    )] = "continuous",
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before new ones get 429.")] = 64,
    request_timeout: Annotated[float, typer.Option(min=1, help="Seconds before a request is abandoned.")] = 120.0,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body (bytes); beyond: 413.")] = 4 << 20,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        min=1, help="Most prompt tokens a request may send; default: the model's context minus max_tokens.")] = None,
    max_stop: Annotated[int, typer.Option(min=0, help="Most stop strings per request (OpenAI: 4).")] = 4,
    max_stop_chars: Annotated[int, typer.Option(min=1, help="Longest stop string (characters).")] = 64,
    max_adapters: Annotated[int, typer.Option(min=0, help="Most adapters loaded at once; admin loads beyond: 409.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="Weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")] = "auto",
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
        admin_key_env=admin_key_env, allow_roots=[Path(r) for r in allow_root or [] if not r.startswith("models:")],
        allow_registry=[r[len("models:"):].strip("/") for r in allow_root or [] if r.startswith("models:")],
        max_batch=max_batch, batching=batching,
        max_queue=max_queue, request_timeout=request_timeout, max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_stop=max_stop,
        max_stop_chars=max_stop_chars, max_adapters=max_adapters, device=device, dtype=dtype, tracking_uri=tracking_uri,
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
    """A ConfigMap with the run config and a KubeRay RayJob running `tunelab run` (k8s.job) on it (cluster.*, k8s.*)."""
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
    from tunelab.cluster.k8s import adapter_reference, dump_yaml, inference_service
    from tunelab.config_file import load_run_config
    from tunelab.registry import default_tracking_uri, lookup_version, resolve_run_dir

    uri = tracking_uri or default_tracking_uri()
    refs = [adapter_reference(n) for n in names]
    versions = [lookup_version(ref, uri) for ref in refs]
    adapters = [(mv.name if sum(v.name == mv.name for v in versions) == 1 else f"{mv.name}-v{mv.version}", mv)
                for mv in versions]
    cfg = _load(config, None) if config else load_run_config(resolve_run_dir(refs[0], uri))[0]
    ranks = {served: _adapter_rank(mv, uri) for served, mv in adapters}
    manifest = inference_service(cfg, service or versions[0].name, adapters, base_uri, runtime, ranks)
    _emit(dump_yaml([manifest]), out_file)


def _adapter_rank(mv: Any, uri: str) -> int:
    """The LoRA rank of a registered adapter: vLLM refuses adapters above --max-lora-rank (default 16)."""
    import json

    from tunelab.artifacts import RunPaths
    from tunelab.registry import resolve_run_dir

    run = RunPaths(resolve_run_dir(f"models:/{mv.name}/{mv.version}", uri))
    return int(json.loads(run.adapter_config.read_text()).get("r") or 0)


def _emit(text: str, out_file: Path | None) -> None:
    if out_file is None:
        print(text, end="")
        return
    from tunelab.artifacts import write_text_atomic

    write_text_atomic(out_file, text)
    out.print(f"wrote {out_file}")
