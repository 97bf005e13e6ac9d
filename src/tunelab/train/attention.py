"""Attention for padding-free batches: each example's causal attention computed on its own.

A padding-free batch is one row of examples end to end, position ids restarting at 0 for each. Stock
transformers (SDPA) handles it with one block-diagonal mask over the whole row: every layer attends over
row-length x row-length scores, most of them masked out, and the kernel cannot use its causal fast path.
Here each example is one SDPA call with `is_causal=True` and no mask, which gives the same output
(tests/train/test_attention.py) with sum(n_i^2) instead of (sum n_i)^2 scores. On the default model, a batch
of 8 chat examples (545 tokens) takes 14 ms per layer for attention forward + backward instead of 33 ms.

On CPU, short examples (up to SHORT_EXAMPLE tokens, most chat rows) skip SDPA altogether: its CPU flash kernel
works in small blocks and its backward was 19% of a training step in a profile. `ShortCausalAttention` does
the textbook computation in batched matmuls over blocks of 128 queries (scores, probabilities x values; in
backward the four gradients): scores and softmax in float32 (as the flash kernel accumulates; bf16 scores, HF
eager attention's numerics, were 3x further from a float32 reference), the probabilities kept for backward in
the compute dtype (~heads x n^2 bytes a layer: the reason for the cut-off). Forward + backward, 9 heads, bf16,
against the flash kernel: 64 tokens 0.6 ms vs 1.1, 137: 1.2 vs 2.9, 256: 3.8 vs 5.6, 600: 13.5 vs 21.9,
1024: 31 vs 40; at 2048 the kernel wins.

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
SHORT_EXAMPLE = 512  # tokens: up to this, CPU attention uses ShortCausalAttention (n^2/2 memory, faster)
QUERY_BLOCK = 128
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
    position_ids = kwargs.get("position_ids")
    lengths = _lengths_once_per_forward(position_ids) if position_ids is not None else [query.shape[2]]
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    textbook = query.device.type == "cpu" and p == 0.0
    if textbook and torch.is_autocast_enabled("cpu"):
        # SDPA is on autocast's lower-precision list, the textbook path must cast alike (RoPE hands over float32
        # q/k beside a bf16 v); its own ops then run with autocast off, each in the dtype it names.
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    parts = [ShortCausalAttention.apply(q[0], k[0], v[0], scale)[None]
             if textbook and attends_textbook(n, "cpu") else
             _sdpa(q, k, v, groups, p, scale)
             for n, q, k, v in zip(lengths, query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, p: float, scale: float) -> torch.Tensor:
    if groups > 1:  # grouped-query attention: repeating K/V is faster than SDPA's enable_gqa on CPU
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)


class ShortCausalAttention(torch.autograd.Function):
    """softmax(scale * q k^T + causal mask) v for one example: q [heads, n, d], k/v [kv_heads, n, d], one dtype.

    Queries go in blocks of QUERY_BLOCK rows, each against the keys up to its last row: the masked upper
    triangle is skipped except on the diagonal blocks, and each block's n-wide float32 rows stay small.
    Grouped-query attention without repeating K/V: the query heads that share a key/value head are stacked
    as one [groups x rows] operand, so each product is kv_heads larger matmuls instead of heads small ones, and
    the gradients of K and V come out summed over their groups by the matmul itself."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        heads, kv_heads = q.shape[0], k.shape[0]
        k32 = k.float()
        outs, probs = [], []
        for start, end in _blocks(q.shape[1]):
            q_block = _stack(q[:, start:end].to(torch.float32, memory_format=torch.contiguous_format), kv_heads)
            scores = torch.bmm(q_block, k32[:, :end].transpose(1, 2)).mul_(scale)
            scores = scores.view(heads, end - start, end)
            scores[:, :, start:end] += _causal_bias(end - start, q.device)
            block = torch.softmax(scores, dim=-1).to(q.dtype)
            outs.append(torch.bmm(block.view(kv_heads, -1, end), v[:, :end]).view(heads, end - start, -1))
            probs.append(block)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, *probs = ctx.saved_tensors
        heads, n, kv_heads = q.shape[0], q.shape[1], k.shape[0]
        grad_out = grad_out.to(out.dtype)
        # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
        row = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        one_block = len(probs) == 1  # most chat examples: each gradient is one product, no sums to keep
        grad_q = None if one_block else torch.empty(out.shape, dtype=out.dtype, device=out.device)
        grad_k = None if one_block else torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = None if one_block else torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for (start, end), block in zip(_blocks(n), probs):
            rows = end - start
            grad_block = _stack(grad_out[:, start:end], kv_heads)
            stacked_probs = block.view(kv_heads, -1, end)
            block_grad_v = torch.bmm(stacked_probs.transpose(1, 2), grad_block)  # before `block` (itself when
            # float32) is scaled
            grad_probs = torch.bmm(grad_block, v[:, :end].transpose(1, 2)).float().view(heads, rows, end)
            grad_scores = block.float().mul_(grad_probs.sub_(row[:, start:end])).mul_(ctx.scale).to(out.dtype)
            grad_scores = grad_scores.view(kv_heads, -1, end)
            block_grad_q = torch.bmm(grad_scores, k[:, :end]).view(heads, rows, -1)
            block_grad_k = torch.bmm(grad_scores.transpose(1, 2), _stack(q[:, start:end], kv_heads))
            if one_block:
                return block_grad_q, block_grad_k, block_grad_v, None
            grad_q[:, start:end] = block_grad_q
            grad_k[:, :end] += block_grad_k
            grad_v[:, :end] += block_grad_v
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None


def _stack(rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[heads, n, d] -> [kv_heads, groups x n, d]: the query heads of each key/value head one after another
    (head h uses key/value head h // groups, as transformers' repeat_kv lays them out)."""
    heads, n, d = rows.shape
    return rows.reshape(kv_heads, heads // kv_heads * n, d)


def attends_textbook(n: int, device: str) -> bool:
    """Whether training attends an n-token example with ShortCausalAttention (else SDPA)."""
    return device == "cpu" and n <= SHORT_EXAMPLE


def saved_probabilities(n: int, device: str) -> int:
    """Softmax probabilities per head and layer that training keeps for an n-token example's backward:
    ShortCausalAttention's blocks on CPU, none where SDPA runs (it recomputes them)."""
    if not attends_textbook(n, device):
        return 0
    return sum((end - start) * end for start, end in _blocks(n))


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + QUERY_BLOCK, n)) for start in range(0, n, QUERY_BLOCK)]


_biases: dict[torch.device, torch.Tensor] = {}


def _causal_bias(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] view of one cached QUERY_BLOCK-square float32 mask: 0 on and below the diagonal, -inf above."""
    if device not in _biases:
        _biases[device] = torch.full((QUERY_BLOCK, QUERY_BLOCK), float("-inf"), device=device).triu(1)
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
