"""A leaner training forward for plain LoRA layers: the same function, fewer passes over the activations.

PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: the dropout scales the whole input
(x * 1/(1-p), then the mask), the branch output is scaled and then added, each a full pass over a
[tokens, features] tensor and, in training, a fresh allocation kept or freed per layer. Both scalars can move
onto the rank-r tensor between A and B (a linear map commutes with a scalar), and the add folds into B's
matmul (`addmm`):

    a = lora_A(x * keep);  result = addmm(result, a * (scaling / (1 - p)), lora_B.weight^T)

so the wide tensors see one mask multiply and one fused matmul-add. The output equals PEFT's up to rounding
order (tests/train/test_lora_forward.py). Measured on the default model, CPU, bf16 autocast (10-step runs,
3 interleaved each): ~8% less time per step and ~5% less peak memory.

The frozen base weight is cast to the autocast dtype once and kept (`_autocast_weight`), where autocast would
cast it again at every call: it cannot cache a cast of a tensor that does not require grad. The matmul sees
the same bf16 values, so the output is bit-identical; backward keeps that same copy instead of a fresh one per
layer, so peak memory does not grow. The copy is remade when the weight changes (its version counter moves).

Used only where it was measured (`train.lean_lora_forward`, on by default): training on CPU with float32
weights under bf16 autocast, one active unmerged plain LoRA adapter without a bias; DoRA and other variants,
several adapters, eval and merged layers keep PEFT's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.train.dropout import KeepMaskDropout


def use_lean_lora_forward(model: nn.Module) -> int:
    """Give every plain PEFT LoRA Linear in `model` the lean training forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and not getattr(module, "_tunelab_lean", False):
            module.forward = _LeanForward(module)
            module._tunelab_lean = True
            count += 1
    return count


class _LeanForward:
    """Bound per module (an instance attribute shadows the class's forward); falls back to PEFT's forward."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        name = _lean_adapter(layer, kwargs)
        if name is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        result = _base_output(layer.base_layer, x, *args, **kwargs)
        dropout = layer.lora_dropout[name]
        scale = layer.scaling[name]
        if isinstance(dropout, KeepMaskDropout):
            keep, kept_scale = dropout.keep_mask(x)
            a = layer.lora_A[name](x * keep)
            scale *= kept_scale
        else:  # nn.Identity (dropout 0) or nn.Dropout
            a = layer.lora_A[name](dropout(x))
        flat = result.reshape(-1, result.shape[-1])
        lora_b = layer.lora_B[name].weight
        out = torch.addmm(flat, (a * scale).reshape(-1, a.shape[-1]).to(flat.dtype), lora_b.t().to(flat.dtype))
        return out.view(result.shape)


def _base_output(base: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`base(x)`; under autocast, a frozen plain Linear reuses its kept low-precision weight."""
    device = x.device.type
    if args or kwargs or type(base) is not nn.Linear or base.weight.requires_grad or not torch.is_autocast_enabled(device):
        return base(x, *args, **kwargs)
    return F.linear(x, _autocast_weight(base, torch.get_autocast_dtype(device)), base.bias)


def _autocast_weight(linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """`linear.weight` cast to `dtype`, made once and kept on the module (not in its state dict) until the
    weight changes."""
    weight = linear.weight
    key = (dtype, weight._version, weight.data_ptr())
    kept = linear.__dict__.get("_tunelab_autocast")
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, weight.detach().to(dtype))
        linear.__dict__["_tunelab_autocast"] = kept
    return kept[1]


def _lean_adapter(layer: Any, kwargs: dict[str, Any]) -> str | None:
    """The adapter the lean path can run, or None where PEFT's own forward must."""
    if not layer.training or layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    return name
