"""LoRA dropout with a cheaper random mask.

PEFT puts an `nn.Dropout` before every adapter; on CPU its mask comes from `bernoulli_` on a float tensor, which
a profile of a training step put at 12-13% of the step (seven adapters a layer each draw a mask of the whole
batch). `KeepMaskDropout` draws the same mask from raw random integers: a position is kept when a uniform
31-bit integer is at least round(p * 2^31), i.e. with probability 1 - p to within 2^-31 (float32's own
resolution around p is coarser), independently per element and per adapter, kept values scaled by 1 / (1 - p)
as `nn.Dropout` does. Only the bool mask, one byte an element, is kept for the backward pass, where
`nn.Dropout` on CPU keeps its float noise tensor (4 bytes an element for float32 adapters). The method is
unchanged; only the random numbers differ, drawn from torch's generator, so seeds still decide them and a
resumed run restores them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_LEVELS = 2**31  # int32 random_() draws from [0, 2^31)


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
        self.threshold = round(p * _LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= self.threshold
        return _ApplyKeepMask.apply(x, keep, 1.0 / (1.0 - self.p))

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
