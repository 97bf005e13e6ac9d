"""RMSNorm and rotary embeddings, forward + backward, on CPU: transformers' Llama code against tunelab's fused
functions (tunelab/train/fused_layers.py), at the default model's shapes and one step's tokens.

    python bench/fused_layers.py [--tokens 1130] [--repeats 20]

RMSNorm: float32 [tokens, 576] in and out (the residual stream under bf16 autocast), frozen weight.
Rotary: bf16 q [1, 9, tokens, 64] and k [1, 3, tokens, 64] (the projections' output under autocast), float32
cos/sin; transformers' result is cast to bf16 as attention does next, the fused one is bf16 already.
Prints milliseconds per call (best of 3 rounds of `--repeats` calls, the two sides interleaved) and per
training step (calls a step makes on the default model: 61 norms, 30 rotary calls).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 576, 9, 3, 64, 30


def rms_norm_sides(tokens: int) -> tuple[Callable[[], None], Callable[[], None]]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunelab.train.fused_layers import rms_norm_forward

    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    norm.weight.requires_grad_(False)
    fused = rms_norm_forward(norm)
    assert fused is not None
    grad = torch.randn(tokens, HIDDEN)

    x = torch.randn(tokens, HIDDEN, requires_grad=True)

    def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def once() -> None:
            torch.autograd.grad(forward(x), x, grad)
        return once

    return run(norm), run(fused)


def rotary_sides(tokens: int) -> tuple[Callable[[], None], Callable[[], None]]:
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from tunelab.train.fused_layers import rotary_function

    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(tokens)[None])
    fused = rotary_function(apply_rotary_pos_emb, HEAD_DIM)
    assert fused is not None
    grads = (torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16),
             torch.randn(1, KV_HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16))

    def stock(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(torch.bfloat16) for t in apply_rotary_pos_emb(q, k, cos, sin))

    # the projections' layout: [1, tokens, heads, dim] viewed as [1, heads, tokens, dim]
    q = torch.randn(1, tokens, HEADS, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)

    def run(rotary: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[[], None]:
        def once() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = rotary(q.transpose(1, 2), k.transpose(1, 2))
            torch.autograd.grad(out, (q, k), grads)
        return once

    return run(stock), run(lambda q, k: fused(q, k, cos, sin))


def best_ms(fn: Callable[[], None], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1130, help="tokens in a step (the benchmark's batch of 8)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.tokens} tokens, {torch.get_num_threads()} threads; ms per call (forward + backward)")
    print(f"{'op':10} {'transformers':>13} {'fused':>8} {'speed-up':>9} {'ms a step saved':>16}")
    for name, sides, per_step in (("rmsnorm", rms_norm_sides, 2 * LAYERS + 1), ("rotary", rotary_sides, LAYERS)):
        stock, fused = sides(args.tokens)
        stock(), fused()
        best = {"stock": float("inf"), "fused": float("inf")}
        for _ in range(3):
            best["stock"] = min(best["stock"], best_ms(stock, args.repeats))
            best["fused"] = min(best["fused"], best_ms(fused, args.repeats))
        saved = (best["stock"] - best["fused"]) * per_step
        print(f"{name:10} {best['stock']:13.2f} {best['fused']:8.2f} {best['stock'] / best['fused']:8.2f}x "
              f"{saved:16.0f}")


if __name__ == "__main__":
    main()
