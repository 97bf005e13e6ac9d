"""Padding-free attention over realistic training rows: forward + backward of tunelab's attention function
(tunelab/train/attention.py) for one decoder layer, several versions of that file side by side.

    python bench/attention_rows.py [--rows 16] [--rounds 9] [--variant before=/path/to/attention.py ...]

Each row is 8 examples whose lengths follow bench/train_throughput.py's data (log-normal, median ~110, 20..600
tokens; ~1,130 tokens a row), laid out as the model hands them over in training: bf16, the default model's 9
query heads and 3 key/value heads of 64; q and k heads-major (tunelab's fused rotary embedding writes them so),
v a transposed view of its token-major projection. Every variant (the installed
file as `current`, and each `--variant` file) runs all rows once per round, variants interleaved, because this
VM's speed drifts by tens of percent within minutes; prints each variant's median and best milliseconds a row
and the median times the model's 30 layers.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

import tunelab.train.attention as current

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"attention_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_rows(count: int, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        lengths = [min(600, max(20, int(rng.lognormvariate(math.log(110), 0.75)))) for _ in range(8)]
        total = sum(lengths)
        q = torch.randn(1, HEADS, total, DIM, dtype=torch.bfloat16).requires_grad_()
        k = torch.randn(1, KV_HEADS, total, DIM, dtype=torch.bfloat16).requires_grad_()
        v = torch.randn(1, total, KV_HEADS, DIM, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        upstream = torch.randn(1, total, HEADS, DIM, dtype=torch.bfloat16)
        rows.append((q, k, v, upstream, torch.cat([torch.arange(n) for n in lengths])[None]))
    return rows


def milliseconds_a_row(module: ModuleType, rows: list[tuple[torch.Tensor, ...]]) -> float:
    layer = torch.nn.Module().train()  # the attention function reads only `.training` from its module
    started = time.perf_counter()
    for q, k, v, upstream, positions in rows:
        out, _ = module.padding_free_attention_forward(layer, q, k, v, None, position_ids=positions)
        out.backward(upstream)
    return (time.perf_counter() - started) / len(rows) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args()
    variants = {"current": current}
    for spec in args.variant:
        name, path = spec.split("=", 1)
        variants[name] = load(name, Path(path))
    rows = make_rows(args.rows)
    print(f"{args.rows} rows of 8 examples, {sum(r[0].shape[2] for r in rows) / args.rows:.0f} tokens a row")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, module in variants.items():
        milliseconds_a_row(module, rows)  # warm-up
    for _ in range(args.rounds):
        for name, module in variants.items():
            times[name].append(milliseconds_a_row(module, rows))
    print(f"{'variant':>10} {'median ms':>10} {'best ms':>8} {f'x {LAYERS} layers':>12}")
    for name, values in times.items():
        values.sort()
        median = values[len(values) // 2]
        print(f"{name:>10} {median:>10.1f} {values[0]:>8.1f} {median * LAYERS:>12.0f}")


if __name__ == "__main__":
    main()
