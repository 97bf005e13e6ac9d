"""Low-precision copies of frozen weights, made once and kept until the weight changes.

Under autocast a weight that does not require grad is cast again at every call: autocast's cache holds only
casts of leaves that require grad. A frozen weight's cast is the same every step, and on CPU it is not free (the
49k x 576 output head: ~50 ms a step; every LoRA base layer: a fresh bf16 copy per call, kept again by backward).
`kept_cast` makes it once. The copy is keyed on the weight tensor itself (a weak reference: it goes when the weight
goes) and remade when the weight's version counter or storage moves (an in-place update, a loaded state dict), so
the values a matmul sees are always the cast of the current weight, bit for bit.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_kept = WeakTensorKeyDictionary()  # weight -> ((dtype, version, data pointer) when copied, the copy)


def kept_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`, detached, from the kept copy while the weight is unchanged."""
    if weight.dtype == dtype:
        return weight
    key = (dtype, weight._version, weight.data_ptr())
    kept = _kept.get(weight)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, weight.detach().to(dtype))
        _kept[weight] = kept
    return kept[1]


def kept_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The copy kept for `weight`, if any (for tests and memory accounting)."""
    kept = _kept.get(weight)
    return None if kept is None else kept[1]
