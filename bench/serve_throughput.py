"""Benchmark: concurrent mixed-adapter requests through `tunelab serve` vs one-adapter-at-a-time switching.

    python bench/serve_throughput.py [--runs runs/quickstart runs/concise-sft runs/concise-dpo] [--requests 64]

Three ways to answer the same requests (the base plus each adapter, round robin), greedy, same max_tokens:
  mixed     `tunelab serve --max-batch 32`, all requests sent at once by the openai client (64 threads)
  serial    `tunelab serve --max-batch 1`, the same concurrent requests decoded one at a time
  switching in-process PEFT, one request at a time, `set_adapter` (or disable_adapter) before each: the
            usual hand-written multi-adapter server
The answers of all three are compared (they must be identical) and completion tokens/s is reported.
Writes bench/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.serve.conftest import free_port, wait_until_healthy  # noqa: E402

PROMPTS = [
    "Extract the order: Hi, I'd like 3 bags of coffee delivered to Halifax by Friday.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me two tips for learning to cook.",
    "Summarize: The meeting moved to Tuesday because the room was double-booked.",
    "Name three colours of the rainbow.",
    "Explain what a verb is in one sentence.",
    "Translate 'good morning' into French.",
]


def requests_for(names: list[str], n: int) -> list[tuple[str, str]]:
    return [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def via_server(adapters: dict[str, Path], max_batch: int, jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "tunelab", "serve", *[f"{n}={p}" for n, p in adapters.items()], "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(len(jobs) + 8), "--request-timeout", "3600"]
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_API_KEY"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, timeout=300)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)

        def ask(job: tuple[str, str]) -> tuple[str, int]:
            reply = client.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                                   max_tokens=max_tokens, temperature=0)
            return reply.choices[0].message.content, reply.usage.completion_tokens

        ask(jobs[0])  # warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(ask, jobs))
        seconds = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    tokens = sum(t for _, t in results)
    return {"seconds": round(seconds, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "answers": [a for a, _ in results]}


def via_switching(adapters: dict[str, Path], jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    import torch
    from peft import PeftModel

    from tunelab.chat import render_prompt, with_system_prompt
    from tunelab.config import ModelConfig
    from tunelab.eval.generate import generate_greedy
    from tunelab.models import Precision, load_model, load_tokenizer, resolve_model
    from tunelab.pipeline import load_run_config

    base_folder = resolve_model(ModelConfig())
    model = load_model(base_folder, Precision("cpu", None, torch.float32))
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]] / "adapter", adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name] / "adapter", adapter_name=name)
    tokenizers = {name: load_tokenizer(adapters[name] / "adapter") for name in names}
    tokenizers["base"] = load_tokenizer(base_folder)
    systems = {name: load_run_config(adapters[name])[0].data.system_prompt for name in names}
    answers, tokens = [], 0
    started = time.perf_counter()
    for name, prompt in jobs:
        tokenizer = tokenizers[name]
        text = render_prompt(tokenizer, with_system_prompt([{"role": "user", "content": prompt}], systems.get(name)))
        if name == "base":
            with model.disable_adapter():
                (answer,) = generate_greedy(model, tokenizer, [text], max_tokens, 1, show_progress=False)
        else:
            model.set_adapter(name)
            (answer,) = generate_greedy(model, tokenizer, [text], max_tokens, 1, show_progress=False)
        answers.append(answer)
        tokens += len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "completion_tokens_approx": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, nargs="+",
                        default=[ROOT / "runs/quickstart", ROOT / "runs/concise-sft", ROOT / "runs/concise-dpo"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    adapters = {run.name: run.resolve() for run in args.runs}
    jobs = requests_for(["base", *adapters], args.requests)
    mixed = via_server(adapters, args.max_batch, jobs, args.max_tokens)
    print(f"mixed batches (max_batch {args.max_batch}): {mixed['tokens_per_s']} tok/s, {mixed['seconds']} s")
    serial = via_server(adapters, 1, jobs, args.max_tokens)
    print(f"server one at a time: {serial['tokens_per_s']} tok/s, {serial['seconds']} s")
    switching = via_switching(adapters, jobs, args.max_tokens)
    print(f"set_adapter switching: {switching['tokens_per_s']} tok/s, {switching['seconds']} s")
    same = mixed["answers"] == serial["answers"]
    same_switch = sum(a.strip() == b.strip() for a, b in zip(mixed["answers"], switching["answers"]))
    print(f"identical answers: mixed vs serial {same}; mixed vs switching {same_switch}/{len(jobs)}")
    print(f"speed-up of mixed batches: {mixed['tokens_per_s'] / switching['tokens_per_s']:.2f}x vs switching, "
          f"{mixed['tokens_per_s'] / serial['tokens_per_s']:.2f}x vs serial")
    result = {"requests": len(jobs), "adapters": list(adapters), "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "cpu_threads": os.cpu_count(),
              "mixed": {k: v for k, v in mixed.items() if k != "answers"},
              "serial": {k: v for k, v in serial.items() if k != "answers"},
              "switching": {k: v for k, v in switching.items() if k != "answers"},
              "identical_mixed_vs_serial": same, "identical_mixed_vs_switching": same_switch,
              "speedup_vs_switching": round(mixed["tokens_per_s"] / switching["tokens_per_s"], 2),
              "speedup_vs_serial": round(mixed["tokens_per_s"] / serial["tokens_per_s"], 2)}
    out = ROOT / "bench/results/serve_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
