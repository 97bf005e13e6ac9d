"""Causal attention forward + backward for one example on CPU: SDPA's flash kernel against tunelab's
ShortCausalAttention (tunelab/train/attention.py), bf16, the default model's 9 heads of 64.

    python bench/cpu_attention.py [--lengths 64 137 256 600 1024 2048] [--repeats 20]

Prints milliseconds per forward + backward (best of 3 rounds of `--repeats` calls, interleaved) and each
path's relative error against a float32 reference (output and the three gradients).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[64, 137, 256, 600, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    for name, fn in (("flash", flash), ("textbook", textbook)):
        print(f"{name:9s} relative error (out, dq, dk, dv) at 300 tokens:", " ".join(f"{e:.4f}" for e in errors(fn, 300)))
    print(f"{'tokens':>7} {'flash ms':>9} {'textbook ms':>12} {'ratio':>6}")
    for n in args.lengths:
        a, b = milliseconds(flash, n, args.repeats), milliseconds(textbook, n, args.repeats)
        print(f"{n:>7} {a:>9.2f} {b:>12.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
