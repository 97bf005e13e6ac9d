"""Benchmark: every training method on the default model, one process each (so peak memory is its own).

    python bench/methods.py [--steps 6] [--out bench/results/methods.json]

Trains `--steps` optimizer steps of batch 8 on the quickstart data and reports trainable parameters,
peak memory (RSS on CPU, max allocated on CUDA), non-pad tokens/s and the loss first -> last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "lora": {"type": "lora"},
    "dora": {"type": "lora", "use_dora": True},
    "rslora": {"type": "lora", "use_rslora": True},
    "lora+": {"type": "lora", "loraplus_lr_ratio": 16},
    "qlora": {"type": "qlora"},
    "ia3": {"type": "ia3"},
    "prompt_tuning": {"type": "prompt_tuning"},
    "prefix_tuning": {"type": "prefix_tuning"},
    "full": {"type": "full"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "methods.json")
    parser.add_argument("--only", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunelab-methods-"))
    results = {}
    for name in args.only:
        config = {
            "data": {"train": str(ROOT / "examples/order_extraction/train.jsonl"), "val_fraction": 0.0,
                     "test_fraction": 0.0},
            "method": METHODS[name],
            "train": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-4, "save_steps": None},
            "output": {"dir": str(work / name)},
        }
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1]}
            print(name, "failed:", results[name]["error"], flush=True)
            continue
        train = json.loads((work / name / "manifest.json").read_text())["train"]
        results[name] = {
            "trainable_params": train["trainable_params"], "total_params": train["total_params"],
            "trainable_pct": round(100 * train["trainable_params"] / train["total_params"], 3),
            "peak_memory_mb": train["peak_memory_mb"], "tokens_per_second": train["tokens_per_second"],
            "loss_first": round(train["first_loss"], 4), "loss_last": round(train["last_loss"], 4),
            "precision": train["precision"],
        }
        print(name, results[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| method | trainable | % | peak memory MiB | tokens/s | loss first -> last |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
        else:
            print(f"| {name} | {r['trainable_params']:,} | {r['trainable_pct']} | {r['peak_memory_mb']:.0f} "
                  f"| {r['tokens_per_second']:.0f} | {r['loss_first']} -> {r['loss_last']} |")


if __name__ == "__main__":
    main()
