"""LoRA dropout from integer masks: nn.Dropout's distribution and scaling, exact gradients, seeded, and swapped
into every adapter of a PEFT model (and only there)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunelab.train.dropout import KeepMaskDropout, use_keep_mask_dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_like_nn_dropout(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros, so a zero in the output is a dropped element
    dropout = KeepMaskDropout(p).train()
    out = dropout(x)
    kept = out != 0
    n = x.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    assert abs(dropout.host_p - p) <= 2**-17  # p rounded to 16 bits on CPU; the scale uses the rounded p
    torch.testing.assert_close(out[kept], x[kept] / (1 - dropout.host_p))
    # independent per element: neighbours are not correlated
    a, b = kept[:, :-1].float(), kept[:, 1:].float()
    assert abs(((a - a.mean()) * (b - b.mean())).mean().item()) < 5 * p * (1 - p) / n**0.5


def test_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    dropout = KeepMaskDropout(0.25).train()
    out = dropout(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    keep = (out != 0).float()
    torch.testing.assert_close(x.grad, upstream * keep / 0.75)  # 0.25 is a multiple of 2^-16: exact
    assert dropout.eval()(x) is x


def test_masks_follow_torch_seed():
    x = torch.ones(256, 64)
    torch.manual_seed(5)
    first = KeepMaskDropout(0.1).train()(x)
    torch.manual_seed(5)
    assert torch.equal(KeepMaskDropout(0.1).train()(x), first)
    assert not torch.equal(KeepMaskDropout(0.1).train()(x), first)


def test_every_lora_dropout_is_swapped_and_nothing_else(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.attention_dropout = 0.1  # a model dropout that must stay nn.Dropout's business
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))
    before = sum(isinstance(m, nn.Dropout) for m in model.modules())
    lora_dropouts = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict))
    assert use_keep_mask_dropout(model) == lora_dropouts > 0
    assert sum(isinstance(m, KeepMaskDropout) for m in model.modules()) == lora_dropouts
    assert sum(type(m) is nn.Dropout for m in model.modules()) == before - lora_dropouts
    assert use_keep_mask_dropout(model) == 0  # idempotent
    keys = set(model.state_dict())
    assert not any("lora_dropout" in k for k in keys)  # nothing new is saved with the adapter


def test_training_builds_adapters_with_integer_masks_unless_switched_off(tiny_config):
    from tunelab.models import Precision, resolve_model
    from tunelab.train.methods import build_trainable

    base = resolve_model(tiny_config.model)
    precision = Precision("cpu", None, torch.float32)
    tiny_config.method.dropout = 0.1
    model = build_trainable(tiny_config, base, precision)
    assert any(isinstance(m, KeepMaskDropout) for m in model.modules())
    tiny_config.train.integer_dropout_masks = False
    model = build_trainable(tiny_config, base, precision)
    assert not any(isinstance(m, KeepMaskDropout) for m in model.modules())


def test_any_shape_gets_a_mask_of_its_own_size():
    """The CPU mask is cut from 64-bit words, four values a word: sizes that are not a multiple of four."""
    torch.manual_seed(2)
    for shape in [(1,), (3, 5, 7), (2, 1, 9)]:
        x = torch.ones(shape)
        out = KeepMaskDropout(0.5).train()(x)
        assert out.shape == x.shape
        assert set(out.unique().tolist()) <= {0.0, 2.0}



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_mask_in_a_float_dtype_is_the_bool_mask_as_zeros_and_ones(dtype):
    dropout = KeepMaskDropout(0.3)
    x = torch.zeros(37, 11, dtype=dtype)
    torch.manual_seed(8)
    keep, scale = dropout.keep_mask(x)
    torch.manual_seed(8)
    ones, same_scale = dropout.keep_mask(x, dtype=dtype)
    assert keep.dtype == torch.bool and ones.dtype == dtype and ones.shape == keep.shape == x.shape
    assert scale == same_scale
    assert torch.equal(ones, keep.to(dtype))  # exactly 0.0 and 1.0, at the same places
    assert 0.2 < 1 - keep.float().mean() < 0.4
