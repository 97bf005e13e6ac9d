"""Frozen q/k/v (and gate/up) projections, forward + input gradient, on CPU in bf16: one matmul per projection,
as the model runs them, against one matmul over the projections' concatenated weight (the gradient of the
concatenated output gathered into one tensor first, as autograd's split backward does).

    python bench/fused_projections.py [--tokens 1130] [--repeats 30] [--rounds 2]

Prints the best time of `--repeats` per side and round, in milliseconds, at the default model's shapes.
Measured on the Zen 5 machine (docs/performance.md): under 1% of a step either way, so not done.
"""

from __future__ import annotations

import argparse
import time

import torch

HIDDEN = 576
GROUPS = {"q/k/v": [576, 192, 192], "gate/up": [1536, 1536]}


def best_ms(tokens: int, widths: list[int], fused: bool, repeats: int) -> float:
    x = torch.randn(tokens, HIDDEN)
    weights = [torch.randn(w, HIDDEN).bfloat16() for w in widths]
    joined = torch.cat(weights)
    grads = [torch.randn(tokens, w).bfloat16() for w in widths]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        low = x.bfloat16()
        if fused:
            (low @ joined.t()).split(widths, dim=1)
            (torch.cat(grads, dim=1) @ joined).float()
        else:
            for w in weights:
                low @ w.t()
            total = None
            for g, w in zip(grads, weights):  # summed in float32, as the lean LoRA forward's shared cast does
                part = g @ w
                total = part.float() if total is None else total.add_(part)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1130)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, widths in GROUPS.items():
        for _ in range(args.rounds):
            separate = best_ms(args.tokens, widths, False, args.repeats)
            fused = best_ms(args.tokens, widths, True, args.repeats)
            print(f"{name}: separate {separate:.2f} ms, one concatenated matmul {fused:.2f} ms")


if __name__ == "__main__":
    main()
