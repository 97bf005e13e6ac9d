"""Benchmark: eval generation on the default model, 200 prompts x 3 systems (base, few-shot, tuned), batched,
and batched vs one prompt at a time.

    python bench/eval_speed.py [--run runs/quickstart] [--prompts 200] [--batch-size 20]

Uses the run's adapter when --run is given (a fresh, untrained LoRA adapter otherwise: same cost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunelab.chat import render_prompt
from tunelab.config import ModelConfig
from tunelab.data.load import load_records
from tunelab.eval.generate import generate_greedy
from tunelab.eval.run import _with_shots
from tunelab.eval.systems import few_shot_examples
from tunelab.models import Precision, load_model, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--single", type=int, default=20, help="prompts timed one at a time, for the ratio")
    args = parser.parse_args()
    from peft import LoraConfig, PeftModel, get_peft_model

    data = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, str(ROOT / "examples/order_extraction/generate.py"), "--out", str(data),
                    "--test", str(args.prompts)], check=True)
    records = load_records(data / "test.jsonl")[: args.prompts]
    shots = few_shot_examples(load_records(data / "train.jsonl"), 3, seed=0)
    base_path = resolve_model(ModelConfig())
    model = load_model(base_path, Precision("cpu", None, torch.float32))
    if args.run:
        model = PeftModel.from_pretrained(model, args.run / "adapter")
    else:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    tokenizer = load_tokenizer(base_path)
    zero = [render_prompt(tokenizer, r.messages[:-1]) for r in records]
    few = [render_prompt(tokenizer, _with_shots(r.messages[:-1], shots)) for r in records]
    timings = {}
    for name, prompts, adapter_on in (("base", zero, False), ("few_shot", few, False), ("tuned", zero, True)):
        started = time.perf_counter()
        if adapter_on:
            generate_greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, label=name)
        else:
            with model.disable_adapter():
                generate_greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, label=name)
        timings[name] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    generate_greedy(model, tokenizer, zero[: args.single], args.max_new_tokens, 1, label="one at a time")
    single = (time.perf_counter() - started) / args.single
    batched = timings["tuned"] / len(zero)
    result = {"prompts": len(zero), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
              "seconds_per_prompt_batched": round(batched, 3), "seconds_per_prompt_single": round(single, 3),
              "batched_speedup": round(single / batched, 2), "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
