"""LoRA dropout with a cheaper random mask.

PEFT puts an `nn.Dropout` before every adapter; on CPU its mask comes from `bernoulli_` on a float tensor, which
a profile of a training step put at 12-13% of the step (seven adapters a layer each draw a mask of the whole
batch). `KeepMaskDropout` draws the same mask from raw random integers: a position is kept when a uniform
integer is at or above a threshold, i.e. with probability 1 - p, independently per element and per adapter,
kept values scaled by 1 / (1 - p) as `nn.Dropout` does. Only the bool mask, one byte an element, is kept for
the backward pass, where `nn.Dropout` on CPU keeps its float noise tensor (4 bytes an element for float32
adapters). The method is unchanged; only the random numbers differ.

Where the numbers come from:
- on CPU, 16-bit integers cut from a counter-based generator's 64-bit words (numpy's PCG64DXSM, four a word):
  torch's CPU `random_` spends ~3 ns an element on one core (mt19937), still 13% of a step after the switch
  from `bernoulli_`; the 64-bit words take a quarter of that. p is rounded to a multiple of 2^-16
  (0.05 -> 0.050003) and the scale uses the rounded p, so the kept values' expectation is exactly the input.
  Each call seeds the generator with one draw from torch's generator, so `torch.manual_seed` still decides
  every mask and a resumed run (which restores torch's RNG state) draws the same ones;
- elsewhere (GPU), int32 `random_` on the device, kept when >= round(p * 2^31).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

_DEVICE_LEVELS = 2**31  # int32 random_() draws from [0, 2^31)
_HOST_LEVELS = 2**16  # int16 values cut from 64-bit words: [-2^15, 2^15)
_SEED_LIMIT = 2**63 - 1
_SAME_WIDTH_INT = {2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}


class _ApplyKeepMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(scale).mul_(keep)  # scale first: multiplying by a bool mask in place is the cheap order

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(ctx.scale).mul_(keep), None, None


class KeepMaskDropout(nn.Module):
    """nn.Dropout's behaviour (train: zero with probability p, scale the rest by 1/(1-p); eval: identity)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p
        self.device_threshold = round(p * _DEVICE_LEVELS)
        dropped = round(p * _HOST_LEVELS)
        self.host_threshold = dropped - _HOST_LEVELS // 2
        self.host_p = dropped / _HOST_LEVELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep, scale = self.keep_mask(x)
        return _ApplyKeepMask.apply(x, keep, scale)

    def keep_mask(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
        """A fresh mask shaped like `x` and the scale for the kept values (for callers that move the scale
        onto a smaller tensor, as tunelab.train.lora_forward does). The mask is bool, or with `dtype` 0/1
        values of that dtype: on CPU, multiplying by a bool mask converts it on the fly at ~1 ns an element,
        6x the cost of a same-dtype multiply, in forward and again in backward."""
        if x.device.type == "cpu":
            return self._host_mask(x.shape, dtype), 1.0 / (1.0 - self.host_p)
        keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= self.device_threshold
        return (keep if dtype is None else keep.to(dtype)), 1.0 / (1.0 - self.p)

    def _host_mask(self, shape: torch.Size, dtype: torch.dtype | None) -> torch.Tensor:
        n = shape.numel()
        seed = int(torch.randint(_SEED_LIMIT, ()))
        words = np.random.PCG64DXSM(seed).random_raw((n + 3) // 4)
        keep = words.view(np.int16)[:n] >= self.host_threshold  # numpy's compare: ~4x torch's on int16
        if dtype is None:
            return torch.from_numpy(keep).view(shape)
        # 0/1 in `dtype` without a float conversion pass: the integer bit pattern of 1.0, times the mask
        pattern = torch.ones((), dtype=dtype)
        as_int = _SAME_WIDTH_INT[pattern.element_size()]
        ones = keep.astype(as_int[1])
        ones *= pattern.view(as_int[0]).item()
        return torch.from_numpy(ones).view(dtype).view(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_keep_mask_dropout(model: nn.Module) -> int:
    """Swap every LoRA adapter's `nn.Dropout` for KeepMaskDropout of the same p; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                replacement = KeepMaskDropout(dropout.p)
                replacement.train(dropout.training)
                dropouts[name] = replacement
                swapped += 1
    return swapped
