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

The frozen base weight is cast to the autocast dtype once and kept (`tunelab.kept_casts`), where autocast would
cast it again at every call: it cannot cache a cast of a tensor that does not require grad. The matmul sees
the same bf16 values, so the output is bit-identical; backward keeps that same copy instead of a fresh one per
layer, so peak memory does not grow. The copy is remade when the weight changes (its version counter moves).

Under autocast the float32 input of q/k/v (and of gate/up) was cast to bf16 six times (four for gate/up): by
each base matmul and again after each dropout mask. It is cast once (`_SharedCasts`) and every sibling masks
the bf16 copy with a 0/1 mask of the same dtype (on CPU a bool mask is converted on the fly in each multiply,
forward and backward, at ~6x the cost of the multiply itself). Masking by 0/1 and casting commute exactly, so
the forward is bit-identical; each user's gradient still arrives as its own output of `_CastForMany` and the
sum is taken in float32, so only the order of the float32 additions changes.

Used only where it was measured (`train.lean_lora_forward`, on by default): training on CPU with float32
weights under bf16 autocast, one active unmerged plain LoRA adapter without a bias; DoRA and other variants,
several adapters, eval and merged layers keep PEFT's forward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.kept_casts import kept_cast
from tunelab.train.dropout import KeepMaskDropout


def use_lean_lora_forward(model: nn.Module) -> int:
    """Give every plain PEFT LoRA Linear in `model` the lean training forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for parent in model.modules():
        siblings = [m for m in parent.children() if type(m) is Linear and not getattr(m, "_tunelab_lean", False)]
        casts = _SharedCasts(len(siblings))  # q/k/v (and gate/up) read one input: cast it once for all of them
        for slot, module in enumerate(siblings):
            module.forward = _LeanForward(module, casts, slot)
            module._tunelab_lean = True
            count += 1
    return count


class _CastForMany(torch.autograd.Function):
    """`x.to(dtype)` handed out as `count` separate outputs (views of one copy), so that the gradients of its
    several users are summed in float32 here, as they were when each user cast `x` itself, rather than in
    bf16 by autograd's accumulation into one shared tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype, count: int) -> tuple[torch.Tensor, ...]:
        ctx.input_dtype = x.dtype
        low = x.to(dtype)
        return tuple(low.view_as(low) for _ in range(count))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        total = None
        for grad in grads:
            if grad is None:
                continue
            if total is None:
                total = grad.to(ctx.input_dtype)
            else:
                total.add_(grad)
        return total, None, None


class _SharedCasts:
    """The low-precision copy of the input that sibling LoRA layers of one module (q/k/v, gate/up) read, made
    by the first of them and reused by the others: two outputs per layer (its base matmul and its adapter each
    get a gradient of their own). Kept only while that input lives (a weak reference clears it)."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.source: weakref.ref[torch.Tensor] | None = None
        self.key: tuple[int, torch.dtype] | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()

    def get(self, x: torch.Tensor, dtype: torch.dtype, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is None or self.source() is not x or self.key != (x._version, dtype):
            self.outputs = _CastForMany.apply(x, dtype, 2 * self.layers)
            self.source, self.key = weakref.ref(x, self._clear), (x._version, dtype)
        return self.outputs[2 * slot], self.outputs[2 * slot + 1]

    def _clear(self, _: Any) -> None:
        self.source, self.key, self.outputs = None, None, ()


class _LeanForward:
    """Bound per module (an instance attribute shadows the class's forward); falls back to PEFT's forward."""

    def __init__(self, layer: Any, casts: _SharedCasts, slot: int) -> None:
        self.layer, self.casts, self.slot = layer, casts, slot

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        name = _lean_adapter(layer, kwargs)
        if name is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        base_input = adapter_input = x
        device = x.device.type
        if not (args or kwargs) and torch.is_autocast_enabled(device) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device)
            if x.dtype != dtype:  # what autocast would cast at each matmul, cast once for every sibling
                base_input, adapter_input = self.casts.get(x, dtype, self.slot)
        result = _base_output(layer.base_layer, base_input, *args, **kwargs)
        dropout = layer.lora_dropout[name]
        scale = layer.scaling[name]
        if isinstance(dropout, KeepMaskDropout):
            # 0/1 in the input's own dtype: the same values as masking in float32, then casting
            keep, kept_scale = dropout.keep_mask(adapter_input, dtype=adapter_input.dtype)
            a = layer.lora_A[name](adapter_input * keep)
            scale *= kept_scale
        elif isinstance(dropout, nn.Identity):  # dropout 0
            a = layer.lora_A[name](adapter_input)
        else:  # nn.Dropout scales the kept values: at x's own precision, as PEFT does
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
    return F.linear(x, kept_cast(base.weight, torch.get_autocast_dtype(device)), base.bias)


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
