"""Benchmark: how tokens/s and peak memory scale with example length and batch size, tunelab against TRL.

    python bench/train_scaling.py [--lengths 256 1024 4096] [--batches 1 4 16] [--steps 3] [--sides tunelab trl]

Every cell trains the default model for `--steps` optimizer steps on examples of one length (prompt and answer
of equal size, so half the tokens are targets) at one batch size, each side in its own process, with the sides
and settings of bench/train_throughput.py (tunelab's defaults; TRL's SFTTrainer padding-free, bf16, no gradient
checkpointing). A side the kernel kills for memory is recorded as out of memory, and the larger batches of that
length are not tried for that side. Peak memory is the process's peak RSS on CPU (max allocated on CUDA).
Writes bench/results/train_scaling.json and prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import WORDS, make_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDE_SCRIPT = Path(__file__).resolve().parent / "train_throughput.py"
TEMPLATE_TOKENS = 40  # template and default system prompt around one exchange (train_throughput.make_rows)


def rows_of_length(length: int, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` chat rows of about `length` tokens: the words to reverse, then the reversed words."""
    import random

    rng = random.Random(seed)
    words = max(1, (length - TEMPLATE_TOKENS) // 2)
    rows = []
    for i in range(count):
        picked = [rng.choice(WORDS) for _ in range(words)]
        rows.append({"id": f"len{length}-{i}", "messages": [
            {"role": "user", "content": "Write these words in reverse order: " + " ".join(picked)},
            {"role": "assistant", "content": " ".join(reversed(picked))},
        ]})
    return rows


def write_cell_data(folder: Path, length: int, batch: int, steps: int) -> dict[str, Any]:
    from tunelab.chat import encode_records
    from tunelab.config import ModelConfig
    from tunelab.data.load import load_records
    from tunelab.models import tokenizer_for

    folder.mkdir(parents=True, exist_ok=True)
    rows = rows_of_length(length, batch * steps, seed=length)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The held-out loss both sides report is not what this benchmark is about: a few short rows keep it cheap.
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(4, seed=2)))
    examples, _ = encode_records(tokenizer_for(ModelConfig()), load_records(folder / "train.jsonl"), None, 2 * length)
    lengths = [len(e["input_ids"]) for e in examples]
    return {"examples": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths)}


def run_cell(side: str, data: Path, batch: int, length: int) -> dict[str, Any]:
    """One side on one cell's data in its own process; out_of_memory when the kernel killed it (SIGKILL)."""
    command = [sys.executable, str(SIDE_SCRIPT), "--side", side, "--data", str(data), "--batch-size", str(batch),
               "--overrides", *([f"data.max_length={2 * length}"] if side == "tunelab" else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode == -9 or "out of memory" in done.stderr.lower():
        return {"out_of_memory": True}
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    keep = ("tokens_per_second", "peak_memory_mb", "peak_memory_train_mb", "seconds", "steps", "tokens")
    return {k: result.get(k) for k in keep}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=["tunelab", "trl"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_scaling.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tunelab-scaling-"))
    cells: list[dict[str, Any]] = []
    stopped: set[tuple[str, int]] = set()  # (side, length) that ran out of memory at a smaller batch
    for length in args.lengths:
        for batch in sorted(args.batches):
            data = root / f"len{length}-b{batch}"
            shape = write_cell_data(data, length, batch, args.steps)
            for side in args.sides:
                if (side, length) in stopped:
                    result: dict[str, Any] = {"out_of_memory": True, "not_run": "a smaller batch ran out of memory"}
                else:
                    result = run_cell(side, data, batch, length)
                if result.get("out_of_memory"):
                    stopped.add((side, length))
                cells.append({"side": side, "length": length, "batch": batch, **shape, **result})
                shown = ("out of memory" if result.get("out_of_memory") else
                         f"{result['tokens_per_second']:.0f} tok/s, {result['peak_memory_mb']:.0f} MiB")
                print(f"{side} length {length} batch {batch}: {shown}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"steps": args.steps, "cells": cells}, indent=2) + "\n")

    print(f"\n| length | batch | {' | '.join(f'{s} tok/s | {s} peak MiB' for s in args.sides)} |")
    print("|---:|---:|" + "---:|---:|" * len(args.sides))
    for length in args.lengths:
        for batch in sorted(args.batches):
            row = [c for c in cells if c["length"] == length and c["batch"] == batch]
            parts = []
            for side in args.sides:
                c = next(c for c in row if c["side"] == side)
                parts += (["OOM", "OOM"] if c.get("out_of_memory") else
                          [f"{c['tokens_per_second']:.0f}", f"{c['peak_memory_mb']:.0f}"])
            print(f"| {length} | {batch} | {' | '.join(parts)} |")


if __name__ == "__main__":
    main()
