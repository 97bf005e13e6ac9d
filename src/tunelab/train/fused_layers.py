"""RMSNorm and rotary position embeddings for CPU training as single autograd functions.

transformers writes both as chains of small tensor ops, and on CPU (no compiler fusing them) each op is a
pass over fresh [tokens, features] memory, forward and again in backward: RMSNorm is seven ops (cast, square,
mean, add, rsqrt, two multiplies), rotary embeddings ten a tensor (two multiplies, slices, a negation, a concat,
an add, and the cast to bf16 that attention does next, because bf16 q/k times float32 cos/sin is float32). Here
each is one autograd function with a hand-written backward that does the few passes the math needs:

- RMSNorm: y = w * x * r with r = 1/sqrt(mean(x^2) + eps); dx = r * (g*w) - x * r^3 * mean(g*w*x). It keeps
  x and r for backward, as transformers' chain does; a trainable weight gets its gradient too.
- Rotary: the rotation by each position's angle, computed in float32 and rounded once to the dtype the next
  op would cast to (autocast's under autocast); backward is the rotation by the opposite angle. Nothing per
  layer is kept (cos/sin are shared).

Same functions: the outputs equal transformers' up to float32 rounding order (tests/train/test_fused_layers.py).
Measured on the default model's shapes (`python bench/fused_layers.py`): see docs/performance.md.

A model's own RMSNorm and rotary function are replaced only after each is checked to compute the standard form
on random inputs (Gemma's 1 + w norm, Phi-3's partial rotary and interleaved rotations keep their own), and only
while tunelab trains (`fused_layers`): evaluation, generation and saved models see transformers' code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn


class RMSNormFunction(torch.autograd.Function):
    """weight * x / sqrt(mean(x^2, last dim) + eps) for float32 x and weight."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # vector_norm reads x once and allocates nothing of its size (pow().mean() makes a squared copy)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(rstd).sum(dim=tuple(range(grad.dim() - 1)))
        grad_x = None
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            coefficient = torch.linalg.vecdot(scaled, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
            grad_x = scaled.mul_(rstd).addcmul_(x, coefficient)
        return grad_x, grad_weight, None


class RotaryFunction(torch.autograd.Function):
    """x rotated pairwise (dim i with dim i + d/2) by angles given as cos/sin halves, in float32 or wider,
    output in `dtype`. x [..., d]; cos/sin [..., d/2] broadcastable to x's halves."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = x.dtype
        return _rotate(x, cos, sin, dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin, ctx.input_dtype), None, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[x1 cos - x2 sin, x2 cos + x1 sin] in float32 (or wider), rounded once to `dtype`."""
    half = x.shape[-1] // 2
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    wide = x.to(compute)  # one widening copy: mixed bf16 x float32 ops are slower on CPU than the copy
    cos, sin = cos.to(compute), sin.to(compute)
    first, second = wide[..., :half], wide[..., half:]
    out = torch.empty(torch.broadcast_shapes(wide.shape, (*cos.shape[:-1], x.shape[-1])), dtype=compute,
                      device=x.device)
    torch.mul(first, cos, out=out[..., :half]).addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=out[..., half:]).addcmul_(first, sin)
    return out if dtype == compute else out.to(dtype)


def rms_norm_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A fused forward for `module` if it is an RMSNorm computing weight * x / sqrt(mean(x^2) + eps) on
    float32 input (checked against its own forward), else None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1
            or weight.dtype != torch.float32 or not isinstance(eps, float)):
        return None
    own = type(module).forward

    def fused(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = module.weight  # read per call: a wrapper (FSDP) may swap the parameter after this is set up
        if (hidden_states.dtype != torch.float32 or weight.dtype != torch.float32
                or hidden_states.shape[-1] != weight.shape[0]):
            return own(module, hidden_states)
        return RMSNormFunction.apply(hidden_states, weight, eps)

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scale in (1.0, eps ** 0.5):  # the small scale makes eps matter, so a different eps shows
            x = torch.randn(3, weight.shape[0], generator=generator).mul_(scale).to(weight.device)
            if not torch.allclose(fused(x), own(module, x), rtol=1e-5, atol=1e-6 * float(weight.abs().max()) + 1e-12):
                return None
    return fused


def rotary_function(original: Callable[..., Any], head_dim: int) -> Callable[..., Any] | None:
    """A fused stand-in for a model's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` if `original`
    computes the standard rotate-half form (checked on random inputs), else None. Calls it does not cover
    (partial rotary, other layouts) go to `original`."""

    def fused(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any,
              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        d = q.shape[-1]
        if (len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or d % 2 or k.shape[-1] != d or cos.shape[-1] != d
                or sin.shape != cos.shape or not (q.is_floating_point() and cos.is_floating_point())
                or not torch.equal(cos[..., :d // 2], cos[..., d // 2:])
                or not torch.equal(sin[..., :d // 2], sin[..., d // 2:])):
            return original(q, k, cos, sin, *args, **kwargs)
        cos_half = cos[..., :d // 2].unsqueeze(unsqueeze_dim)
        sin_half = sin[..., :d // 2].unsqueeze(unsqueeze_dim)
        dtype = torch.promote_types(q.dtype, cos.dtype)
        if torch.is_autocast_enabled(q.device.type):  # attention casts q/k to this next; round once, here
            dtype = torch.get_autocast_dtype(q.device.type)
        return (RotaryFunction.apply(q, cos_half, sin_half, dtype), RotaryFunction.apply(k, cos_half, sin_half, dtype))

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, head_dim, generator=generator)
    k = torch.randn(1, 1, 5, head_dim, generator=generator)
    angles = torch.randn(1, 5, head_dim // 2, generator=generator)
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    try:
        expected = original(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a signature or layout we do not know: keep the model's own
        return None
    got = fused(q, k, cos, sin)
    fused.fused_from = original  # type: ignore[attr-defined]
    if not all(isinstance(e, torch.Tensor) and e.shape == g.shape and torch.allclose(e, g, atol=1e-5)
               for e, g in zip(expected, got)):
        return None
    return fused


def fused_training_layers(cfg: Any, device: str, model: nn.Module) -> Any:
    """`fused_layers(model)` where it was measured (training on CPU, `train.fused_norm_rope`), else a no-op."""
    return fused_layers(model) if cfg.train.fused_norm_rope and device == "cpu" else nullcontext(0)


@contextmanager
def fused_layers(model: nn.Module) -> Iterator[int]:
    """While inside: `model`'s standard RMSNorm layers and rotary function run fused (yields how many
    replacements were made); transformers' own are back afterwards."""
    norms = []
    for module in model.modules():
        forward = rms_norm_forward(module)
        if forward is not None and "forward" not in vars(module):
            module.forward = forward
            norms.append(module)
    swapped: list[tuple[Any, Callable[..., Any]]] = []
    head_dim = _head_dim(model)
    for name in {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}:
        home = sys.modules.get(name)
        original = getattr(home, "apply_rotary_pos_emb", None)
        if (home is None or original is None or head_dim is None or head_dim % 2
                or hasattr(original, "fused_from")):  # already swapped by an enclosing fused_layers
            continue
        replacement = rotary_function(original, head_dim)
        if replacement is not None:
            home.apply_rotary_pos_emb = replacement
            swapped.append((home, original))
    try:
        yield len(norms) + len(swapped)
    finally:
        for module in norms:
            del module.forward
        for home, original in swapped:
            home.apply_rotary_pos_emb = original


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    return head_dim if isinstance(head_dim, int) else None
