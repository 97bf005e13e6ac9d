"""The chunked loss's forward + backward on CPU at the default model's head (576 -> 49,152, frozen, bf16 autocast)
for several chunk sizes: the figures behind `tunelab.losses.CPU_CHUNK_ELEMENTS`.

    python bench/chunked_loss.py [--rows 628] [--chunks 64 128 256 1024] [--rounds 3]

Prints milliseconds per call (mean of 3 calls, each round; chunk sizes interleaved within a round).
"""

from __future__ import annotations

import argparse
import time

import torch

from tunelab.losses import chunk_rows, linear_cross_entropy_sum

HIDDEN, VOCAB = 576, 49152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=628, help="target tokens in a step")
    parser.add_argument("--chunks", type=int, nargs="*", default=[64, 128, 256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.05
    targets = torch.randint(0, VOCAB, (args.rows,), generator=generator)

    def call(chunk: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy_sum(hidden, weight, targets, chunk)
        loss.backward()

    print(f"{args.rows} target rows, vocabulary {VOCAB}, {torch.get_num_threads()} threads; default chunk on CPU: "
          f"{chunk_rows(VOCAB, 'cpu', head_trains=False)} rows")
    results: dict[int, list[float]] = {chunk: [] for chunk in args.chunks}
    for _ in range(args.rounds):
        for chunk in args.chunks:
            call(chunk)  # warm: the allocator's blocks for this size
            started = time.perf_counter()
            for _ in range(3):
                call(chunk)
            results[chunk].append((time.perf_counter() - started) / 3 * 1e3)
    for chunk, times in results.items():
        print(f"chunk {chunk:5d} rows: " + ", ".join(f"{t:.0f}" for t in times) + " ms a call")


if __name__ == "__main__":
    main()
