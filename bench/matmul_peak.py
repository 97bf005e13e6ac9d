"""Benchmark: this machine's sustained matmul throughput (GFLOP/s) at the default model's layer shapes, bf16 and fp32.

    python bench/matmul_peak.py [--tokens 920] [--repeats 5] [--out bench/results/matmul_peak.json]

The denominator of the SFT benchmark's model FLOPs utilization (bench/train_throughput.py reads the JSON). For
every projection of a layer (q/k/v/o, gate/up/down) and the output head, at `--tokens` rows (8 examples of
~115 tokens, a training batch of the benchmark's data), two products are timed, as training runs them:
forward X W^T ([tokens, in] x [in, out]) and the activation gradient dY W ([tokens, out] x [out, in]). Each is
warmed up (each dtype's first after `--warmup-seconds` of spinning), then timed in `--repeats` rounds of about
`--round-seconds`; a shape's figure is its median round. Threads: torch's default (torch.get_num_threads()), as
the training sides use.

Reported per dtype: `peak_gflops`, the best shape (what MFU divides by), and `model_mix_gflops`, the FLOPs of
one training step's frozen matmuls (every layer's projections forward and backward, the head at target
positions, ~37% of the tokens) over their summed times: what these shapes allow at best, all together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_flops import projections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAD_SHARE = 0.37  # targets / tokens in the SFT benchmark's data (2,006 of 5,363 in its committed run)


def model_config() -> Any:
    from transformers import AutoConfig

    from tunelab.config import ModelConfig
    from tunelab.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(ModelConfig()))


def time_product(fn: Any, round_seconds: float, repeats: int) -> list[float]:
    """Seconds per call of `fn`, one figure per timed round, after a warm-up round."""
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < round_seconds / 2:  # warm-up; also sizes the rounds
        fn()
        calls += 1
    per_round = max(1, int(calls * round_seconds / (time.perf_counter() - started + 1e-9)))
    rounds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - started) / per_round)
    return rounds


def measure(shapes: dict[str, tuple[int, int]], tokens: int, dtype_name: str, round_seconds: float,
            repeats: int, warmup_seconds: float) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    # Brings the cores to their sustained clock and the kernels' caches up before the first figure counts.
    n_in, n_out = shapes["gate_proj"]
    x, w = torch.randn(tokens, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
    time_product(lambda: F.linear(x, w), warmup_seconds, 1)
    rows = []
    for name, (n_in, n_out) in shapes.items():
        w = torch.randn(n_out, n_in, dtype=dtype)
        x, dy = torch.randn(tokens, n_in, dtype=dtype), torch.randn(tokens, n_out, dtype=dtype)
        flops = 2 * tokens * n_in * n_out
        with torch.no_grad():
            for direction, fn in (("forward", lambda: F.linear(x, w)), ("input_grad", lambda: dy @ w)):
                seconds = time_product(fn, round_seconds, repeats)
                gflops = [flops / s / 1e9 for s in seconds]
                rows.append({"shape": name, "direction": direction, "in": n_in, "out": n_out, "tokens": tokens,
                             "gflops": round(statistics.median(gflops), 1),
                             "gflops_range": [round(min(gflops), 1), round(max(gflops), 1)],
                             "seconds_per_call": statistics.median(seconds)})
                print(f"{dtype_name:>8} {name:>9} {direction:>10} [{tokens}x{n_in}]x[{n_in}x{n_out}]: "
                      f"{rows[-1]['gflops']:.1f} GFLOP/s", flush=True)
    return rows


def model_mix(rows: list[dict[str, Any]], layers: int) -> float:
    """GFLOP/s over one training step's frozen matmuls: each layer's products `layers` times, the head's at
    HEAD_SHARE of the tokens (the loss needs logits only at target positions)."""
    flops = seconds = 0.0
    for r in rows:
        weight = HEAD_SHARE if r["shape"] == "lm_head" else layers
        flops += weight * 2 * r["tokens"] * r["in"] * r["out"]
        seconds += weight * r["seconds_per_call"]
    return flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=920, help="rows of each product (8 examples x ~115 tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per product")
    parser.add_argument("--round-seconds", type=float, default=0.5, help="about how long one timed round lasts")
    parser.add_argument("--warmup-seconds", type=float, default=3.0, help="spin before each dtype's first figure")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "matmul_peak.json")
    args = parser.parse_args()

    import torch

    config = model_config()
    shapes = {**projections(config), "lm_head": (config.hidden_size, config.vocab_size)}
    load_before = os.getloadavg()
    results = {dtype: measure(shapes, args.tokens, dtype, args.round_seconds, args.repeats,
                                  args.warmup_seconds) for dtype in args.dtypes}
    out = {
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": _cpu_name(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "tokens": args.tokens, "repeats": args.repeats, "round_seconds": args.round_seconds,
        "peak_gflops": {d: max(r["gflops"] for r in rows) for d, rows in results.items()},
        "model_mix_gflops": {d: round(model_mix(rows, config.num_hidden_layers), 1) for d, rows in results.items()},
        "shapes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for dtype in results:
        print(f"{dtype}: peak {out['peak_gflops'][dtype]:.1f} GFLOP/s (best shape), "
              f"{out['model_mix_gflops'][dtype]:.1f} GFLOP/s over the model's mix; {out['threads']} threads")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
