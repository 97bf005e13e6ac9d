"""Causal attention forward + backward for one example on CPU: SDPA's flash kernel against tunelab's
ShortCausalAttention (tunelab/train/attention.py), bf16, the default model's 9 heads of 64.

    python bench/cpu_attention.py [--lengths 64 137 256 600 1024 2048] [--repeats 20]
    python bench/cpu_attention.py --rows 24 [--wastes 0 1.25 1.5 2]

Prints milliseconds per forward + backward (best of 3 rounds of `--repeats` calls, interleaved) and each
path's relative error against a float32 reference (output and the three gradients).

With --rows: padding-free rows of 8 examples whose lengths follow bench/train_throughput.py's data (log-normal,
median ~110, 20..600 tokens), through tunelab's attention for padding-free training (9 query heads, 3 key/value
heads, bf16), once per PADDING_WASTE (0: every example on its own; 1.25: the default). Prints milliseconds per
row for forward + backward (best of 3 rounds over all rows, wastes interleaved) and the saved probabilities.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tunelab.train import attention
from tunelab.train.attention import ShortCausalAttention

HEADS, DIM = 9, 64


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


def textbook(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ShortCausalAttention.apply(q, k, v, DIM**-0.5)


def milliseconds(fn: Callable[..., torch.Tensor], n: int, repeats: int) -> float:
    q, k, v = (torch.randn(HEADS, n, DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fn(q, k, v).float().sum().backward()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            fn(q, k, v).float().sum().backward()
        best = min(best, (time.perf_counter() - started) / repeats * 1e3)
    return best


def errors(fn: Callable[..., torch.Tensor], n: int) -> list[float]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(HEADS, n, DIM) * 2 for _ in range(3))
    upstream = torch.randn(HEADS, n, DIM)
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash(*exact)
    (out * upstream).sum().backward()
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    got = fn(*low)
    (got.float() * upstream).sum().backward()
    pairs = [(got.float(), out), *[(a.grad.float(), b.grad) for a, b in zip(low, exact)]]
    return [float((a - b).norm() / b.norm()) for a, b in pairs]


def row_lengths(rows: int, batch: int = 8, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[min(600, max(20, int(rng.lognormvariate(math.log(110), 0.75)))) for _ in range(batch)]
            for _ in range(rows)]


def rows_milliseconds(rows: list[list[int]], waste: float) -> float:
    """Forward + backward of every row once, milliseconds a row."""

    class Layer(torch.nn.Module):  # what transformers hands the attention function: only .training is read
        pass

    layer = Layer().train()
    inputs = []
    for lengths in rows:
        total = sum(lengths)
        q = torch.randn(1, HEADS, total, DIM, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, 3, total, DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        inputs.append((q, k, v, torch.cat([torch.arange(n) for n in lengths])[None]))
    attention.PADDING_WASTE = waste
    started = time.perf_counter()
    for q, k, v, positions in inputs:
        attention._last_plan = None
        out, _ = attention.padding_free_attention_forward(layer, q, k, v, None, position_ids=positions)
        out.float().sum().backward()
    return (time.perf_counter() - started) / len(rows) * 1e3


def compare_rows(count: int, wastes: list[float]) -> None:
    rows = row_lengths(count)
    print(f"{count} rows of 8, {sum(map(sum, rows)) / count:.0f} tokens a row on average")
    best = {w: float("inf") for w in wastes}
    for _ in range(3):
        for waste in wastes:
            best[waste] = min(best[waste], rows_milliseconds(rows, waste))
    default = attention.PADDING_WASTE = 1.25
    print(f"{'waste':>6} {'ms a row':>9} {'x 30 layers':>12} {'saved probs':>12}")
    for waste in wastes:
        attention.PADDING_WASTE = waste
        probs = sum(attention.saved_probabilities(lengths, "cpu") for lengths in rows) / count
        print(f"{waste:>6} {best[waste]:>9.2f} {best[waste] * 30:>12.0f} {probs:>12.0f}")
    attention.PADDING_WASTE = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[64, 137, 256, 600, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", type=int, help="compare padding wastes on this many padding-free rows")
    parser.add_argument("--wastes", type=float, nargs="*", default=[0, 1.25, 1.5, 2.0])
    args = parser.parse_args()
    if args.rows:
        compare_rows(args.rows, args.wastes)
        return
    for name, fn in (("flash", flash), ("textbook", textbook)):
        print(f"{name:9s} relative error (out, dq, dk, dv) at 300 tokens:", " ".join(f"{e:.4f}" for e in errors(fn, 300)))
    print(f"{'tokens':>7} {'flash ms':>9} {'textbook ms':>12} {'ratio':>6}")
    for n in args.lengths:
        a, b = milliseconds(flash, n, args.repeats), milliseconds(textbook, n, args.repeats)
        print(f"{n:>7} {a:>9.2f} {b:>12.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
