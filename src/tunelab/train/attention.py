"""Attention for padding-free batches: each example's causal attention computed on its own.

A padding-free batch is one row of examples end to end, position ids restarting at 0 for each. Stock
transformers (SDPA) handles it with one block-diagonal mask over the whole row: every layer attends over
row-length x row-length scores, most of them masked out, and the kernel cannot use its causal fast path.
Here each example is one SDPA call with `is_causal=True` and no mask, which gives the same output
(tests/train/test_attention.py) with sum(n_i^2) instead of (sum n_i)^2 scores. On the default model, a batch
of 8 chat examples (545 tokens) takes 14 ms per layer for attention forward + backward instead of 33 ms.

On CPU, short examples (up to SHORT_EXAMPLE tokens, most chat rows) skip SDPA altogether: its CPU flash kernel
works in small blocks and its backward was 19% of a training step in a profile. `ShortCausalAttention` does
the textbook computation in batched matmuls (scores, probabilities x values; in backward the four
gradients): scores and softmax in float32 (as the flash kernel accumulates; bf16 scores, HF eager attention's
numerics, were 3x further from a float32 reference), the probabilities kept for backward in the compute dtype
(2 bytes x heads x n^2 a layer). Forward + backward of one 137-token example, 9 heads, bf16: 1.2 ms instead of
2.9 (64 tokens: 0.6 vs 1.1); at ~300 tokens the two meet and past that the n^2 elementwise work loses, hence
the cut-off.

Only active while tunelab trains padding-free (`padding_free_attention`), where every batch the model sees
is such a row; the attention implementation is restored afterwards, so evaluation, generation and saved
configs see stock SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

NAME = "tunelab_padding_free"
SHORT_EXAMPLE = 256  # tokens: up to this, CPU attention uses ShortCausalAttention (n^2 memory, faster)
_last_lengths: tuple[torch.Tensor, list[int]] | None = None  # every layer of one forward gets the same tensor


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the examples in a padding-free row: a new example starts wherever the position is 0."""
    row = position_ids[0]
    starts = torch.nonzero(row == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [end - start for start, end in zip(starts, [*starts[1:], row.shape[0]])]


def padding_free_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: torch.Tensor | None,
                                   dropout: float = 0.0, scaling: float | None = None,
                                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] -> output [1, T, heads, d] (SDPA's layout).

    `attention_mask` is ignored: transformers builds none for an implementation without a registered mask
    function, and the example boundaries come from `position_ids`."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"{NAME} attention takes one padding-free row without a KV cache; got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: on CPU repeating K/V is faster than SDPA's enable_gqa
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    position_ids = kwargs.get("position_ids")
    lengths = _lengths_once_per_forward(position_ids) if position_ids is not None else [query.shape[2]]
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    textbook = query.device.type == "cpu" and p == 0.0
    parts = [ShortCausalAttention.apply(q[0], k[0], v[0], scale)[None]
             if textbook and n <= SHORT_EXAMPLE else
             F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)
             for n, q, k, v in zip(lengths, query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


class ShortCausalAttention(torch.autograd.Function):
    """softmax(scale * q k^T + causal mask) v for one example, q/k/v [heads, n, d] of one dtype."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        n = q.shape[1]
        mask = _causal_bias(n, q.device).expand(q.shape[0], n, n)
        scores = torch.baddbmm(mask, q.float(), k.float().transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, probs, out = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        grad_probs = torch.bmm(grad_out, v.transpose(1, 2)).float()
        # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
        row = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_scores = probs.float().mul_(grad_probs.sub_(row)).mul_(ctx.scale).to(q.dtype)
        return torch.bmm(grad_scores, k), torch.bmm(grad_scores.transpose(1, 2), q), grad_v, None


_biases: dict[torch.device, torch.Tensor] = {}


def _causal_bias(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] view of one cached SHORT_EXAMPLE-square float32 mask: 0 on and below the diagonal, -inf above."""
    if device not in _biases:
        _biases[device] = torch.full((SHORT_EXAMPLE, SHORT_EXAMPLE), float("-inf"), device=device).triu(1)
    return _biases[device][:n, :n]


def _lengths_once_per_forward(position_ids: torch.Tensor) -> list[int]:
    """Reading the boundaries moves them to the host (a sync on GPU): do it once per forward, not per layer."""
    global _last_lengths
    if _last_lengths is None or _last_lengths[0] is not position_ids:
        _last_lengths = (position_ids, segment_lengths(position_ids))
    return _last_lengths[1]


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, padding_free_attention_forward)


@contextmanager
def padding_free_attention(model: Any) -> Iterator[None]:
    """Train `model` (a PEFT wrapper or a plain model) with per-example attention; restore its own after.

    Models that do not use SDPA (eager, flash-attention kernels, which handle position ids themselves)
    are left as they are."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if before != "sdpa":
        yield
        return
    register()
    base.set_attn_implementation(NAME)
    try:
        yield
    finally:
        base.set_attn_implementation(before)
