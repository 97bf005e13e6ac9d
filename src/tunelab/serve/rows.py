"""Rows that each keep their own KV cache, decoded together in one forward pass.

Continuous batching admits and retires requests between decode steps, so the rows of a step have caches of
different lengths. Stacking them into one padded tensor would change every row's arithmetic with its neighbours
(left padding shifts the attention reduction, different batch shapes change the matmul kernel), and greedy answers
would then depend on who else was in the batch. Here instead (docs/adr/0005-continuous-batching.md):

- each row owns a `DynamicCache` (filled by a prefill of that row alone, exactly as when it is decoded alone);
- a decode step stacks one new token per row: the linear layers, the bulk of the work, run once for all rows;
- `RowsCache.update` appends each row's new key/value to that row's own cache, and the attention function
  (registered with transformers as `tunelab_rows`) runs SDPA row by row over that row's own cache: the same
  shapes, hence the same arithmetic, as the row decoded alone;
- the batch is padded with idle rows so that every adapter's group of rows is a multiple of `quantum`: CPU GEMM
  kernels compute a row the same way whatever the batch size only above and at multiples of their tile height
  (MKL: 4 rows), and PEFT runs each adapter's LoRA on that adapter's rows alone. `row_quantum` measures the
  smallest such multiple on this machine at start-up instead of assuming it.
"""

from __future__ import annotations

from typing import Any

ATTENTION = "tunelab_rows"
QUANTA = (1, 2, 4, 8, 16)


class RaggedKV(list):
    """One layer's keys (or values) for a decode step: row i's whole cache, or None for an idle padding row."""


def rows_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, RaggedKV):  # a prefill (one row, its own plain cache): ordinary SDPA with its mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [None if k is None else sdpa_attention_forward(module, query[i:i + 1], k, v, None, **kwargs)[0]
               for i, (k, v) in enumerate(zip(key, value))]
    shape = next(o for o in outputs if o is not None)
    return torch.cat([shape.new_zeros(shape.shape) if o is None else o for o in outputs]), None


def use_row_attention(model: Any) -> None:
    """Route `model`'s attention through `rows_attention` (SDPA for everything but ragged decode steps)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, rows_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # prefills get SDPA's masks (sliding windows included)
    model.config._attn_implementation = ATTENTION


class RowsCache:
    """The `past_key_values` of one decode step: a view over the rows' own caches (None: a padding row)."""

    is_compileable = False

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        keys, values = RaggedKV(), RaggedKV()
        for i, cache in enumerate(self.caches):
            if cache is None:
                keys.append(None)
                values.append(None)
                continue
            k, v = cache.update(key_states[i:i + 1], value_states[i:i + 1], layer_idx, *args, **kwargs)
            keys.append(k)
            values.append(v)
        return keys, values


def padded_groups(groups: dict[str, list[Any]], quantum: int) -> list[tuple[str, Any]]:
    """(adapter, row or None) in batch order: each adapter's rows together, padded with None to a multiple of
    `quantum` rows, so that every matmul a row takes part in (the base's and its adapter's) has a height that
    computes it as it would be computed alone."""
    order: list[tuple[str, Any]] = []
    for adapter, rows in groups.items():
        order += [(adapter, row) for row in rows]
        order += [(adapter, None)] * (-len(rows) % quantum)
    return order


def linear_shapes(model: Any) -> set[tuple[int, int]]:
    import torch

    return {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}


def row_quantum(shapes: set[tuple[int, int]], max_rows: int, dtype: Any, device: Any) -> int | None:
    """The smallest q such that, for every (out, in) weight shape, a row's result of `x @ W.T` is bit-identical
    whether the batch has q, 2q, 3q, 4q or `max_rows` (rounded up) rows. None when no q up to 16 holds: decoding
    next to other rows can then change a greedy answer by float rounding."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for q in QUANTA:
        largest = max(4 * q, -(-max_rows // q) * q)
        heights = sorted({q, 2 * q, 3 * q, 4 * q, largest})
        if all(_invariant(out, inp, heights, generator, dtype, device) for out, inp in sorted(shapes)):
            return q
    return None


def _invariant(out: int, inp: int, heights: list[int], generator: Any, dtype: Any, device: Any) -> bool:
    import torch

    weight = torch.randn(out, inp, generator=generator).to(dtype=dtype, device=device)
    x = torch.randn(heights[-1], inp, generator=generator).to(dtype=dtype, device=device)
    with torch.inference_mode():
        full = torch.nn.functional.linear(x, weight)
        return all(torch.equal(torch.nn.functional.linear(x[:h], weight), full[:h]) for h in heights[:-1])
