"""The lean LoRA training forward computes PEFT's function (same output and gradients up to rounding order),
draws the same dropout masks, and steps aside wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.dropout import use_keep_mask_dropout
from tunelab.train.lora_forward import use_lean_lora_forward


def _lora_model(tiny_model_dir, dropout: float, **lora: object):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             init_lora_weights=False, **lora))  # B != 0: the branch counts
    use_keep_mask_dropout(model)
    return model.train()


def _loss_and_grads(model, ids, seed: int = 3, autocast: bool = False):
    model.zero_grad()
    torch.manual_seed(seed)  # the dropout masks: both forwards draw them in the same order
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_equals_peft_forward_in_float32(tiny_model_dir, dropout):
    model = _lora_model(tiny_model_dir, dropout)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    peft_loss, peft_grads = _loss_and_grads(model, ids)
    assert use_lean_lora_forward(model) == sum(1 for n, _ in model.named_modules() if n.endswith("_proj")) > 0
    lean_loss, lean_grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(lean_loss, peft_loss, rtol=1e-6, atol=0)
    assert lean_grads.keys() == peft_grads.keys()
    for name, grad in peft_grads.items():
        # gradients of order 1: rounding order moves single elements by a few 1e-6 (a wrong mask or scale: ~0.1)
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    other_seed, _ = _loss_and_grads(model, ids, seed=4)
    assert (other_seed != lean_loss) == (dropout > 0)  # the masks are drawn, not fixed


def test_as_close_to_float32_as_peft_under_bf16_autocast(tiny_model_dir):
    """bf16 rounds in different places on the two paths, so each is measured against the float32 result; on one
    batch either can come out ahead (gradient errors of 4-6% on this tiny random model), so over three batches
    the lean path's typical gradient error may not exceed PEFT's by more than a quarter (measured: ~1.04x)."""
    import statistics

    lean_errors, peft_errors = [], []
    for seed in range(3):
        model = _lora_model(tiny_model_dir, 0.05)
        ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
        exact_loss, exact_grads = _loss_and_grads(model, ids)
        peft_loss, peft_grads = _loss_and_grads(model, ids, autocast=True)
        use_lean_lora_forward(model)
        lean_loss, lean_grads = _loss_and_grads(model, ids, autocast=True)
        assert abs(float(lean_loss - exact_loss)) < 0.01 * float(exact_loss)

        def error(grads, name):
            return float((grads[name] - exact_grads[name]).norm() / exact_grads[name].norm())

        lean_errors.append(statistics.median(error(lean_grads, n) for n in exact_grads))
        peft_errors.append(statistics.median(error(peft_grads, n) for n in exact_grads))
    assert sum(lean_errors) < 1.25 * sum(peft_errors), (lean_errors, peft_errors)


def test_steps_aside_in_eval_for_dora_and_when_merged(tiny_model_dir):
    ids = torch.randint(3, 50, (1, 10), generator=torch.Generator().manual_seed(2))
    model = _lora_model(tiny_model_dir, 0.0)
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
        use_lean_lora_forward(model)
        assert torch.equal(model(input_ids=ids).logits, before)  # eval: PEFT's own forward, bit for bit
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.train()
        assert torch.equal(model(input_ids=ids).logits, merged)  # merged: the base layer alone
    dora = _lora_model(tiny_model_dir, 0.0, use_dora=True)
    for module in dora.modules():  # at initialization DoRA's magnitudes reproduce plain LoRA: move them off
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            module.lora_magnitude_vector["default"].weight.data.mul_(1.5)
    with torch.no_grad():
        dora_before = dora(input_ids=ids).logits  # train mode, no dropout: deterministic
        assert use_lean_lora_forward(dora) > 0
        # DoRA's magnitude rescaling is not in the lean path: had it run, the logits would differ
        assert torch.equal(dora(input_ids=ids).logits, dora_before)


def test_saved_adapter_is_unchanged(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model = _lora_model(tiny_model_dir, 0.1)
    model.save_pretrained(tmp_path / "peft")
    use_lean_lora_forward(model)
    model.save_pretrained(tmp_path / "lean")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "lean" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_trainable_uses_it_on_cpu_autocast_only(tiny_config, tiny_model_dir):
    from tunelab.models import Precision
    from tunelab.train.methods import build_trainable

    autocast = Precision("cpu", torch.bfloat16, torch.float32)
    lean = [m for m in build_trainable(tiny_config, tiny_model_dir, autocast).modules() if hasattr(m, "_tunelab_lean")]
    assert lean
    tiny_config.train.lean_lora_forward = False
    assert not any(hasattr(m, "_tunelab_lean") for m in build_trainable(tiny_config, tiny_model_dir, autocast).modules())
    tiny_config.train.lean_lora_forward = True
    fp32 = build_trainable(tiny_config, tiny_model_dir, Precision("cpu", None, torch.float32))
    assert not any(hasattr(m, "_tunelab_lean") for m in fp32.modules())


def test_kept_low_precision_base_weight_is_exact_and_follows_the_weight(tiny_model_dir):
    """Under autocast the base weight's bf16 copy is made once and reused: the loss and gradients are bit-identical
    to casting at every call, the copy stays out of the state dict, and a changed weight gets a new copy."""
    from tunelab.kept_casts import kept_copy
    from tunelab.train.lora_forward import _base_output

    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    model = _lora_model(tiny_model_dir, 0.1)
    use_lean_lora_forward(model)
    keys = set(model.state_dict())
    first = _loss_and_grads(model, ids, autocast=True)
    kept = [m for n, m in model.named_modules() if n.endswith("base_layer") and kept_copy(m.weight) is not None]
    assert len(kept) == sum(1 for n, _ in model.named_modules() if n.endswith("_proj"))
    again = _loss_and_grads(model, ids, autocast=True)  # now from the kept copies
    assert torch.equal(first[0], again[0]) and all(torch.equal(first[1][k], again[1][k]) for k in first[1])
    assert set(model.state_dict()) == keys

    linear = kept[0]
    x = torch.randn(3, linear.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_base_output(linear, x), linear(x))  # autocast's own cast, bit for bit
        with torch.no_grad():
            linear.weight.mul_(2.0)  # an in-place change (merge, a loaded state dict): the copy must follow
        assert torch.equal(_base_output(linear, x), linear(x))
    assert torch.equal(_base_output(linear, x), linear(x))  # outside autocast: the float32 weight itself


def test_siblings_cast_their_shared_input_once_with_the_same_result(tiny_model_dir, monkeypatch):
    """q/k/v (and gate/up) read one float32 input: under autocast it is cast to bf16 once for all of them. The
    forward is bit-identical to each layer casting for itself, and the gradients differ only by the order of
    float32 additions (each user's gradient still reaches the input through its own float32 sum)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tunelab.train import lora_forward

    class CountInputCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and args[0].dim() == 3:
                self.count += 1  # [batch, tokens, features] activations cast down, not weights
            return func(*args, **(kwargs or {}))

    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(6))
    model = _lora_model(tiny_model_dir, 0.1)
    use_lean_lora_forward(model)
    layers = model.config.num_hidden_layers
    with CountInputCasts() as shared:
        shared_loss, shared_grads = _loss_and_grads(model, ids, autocast=True)
    monkeypatch.setattr(lora_forward._SharedCasts, "get", lambda self, x, dtype, slot: (x, x))
    with CountInputCasts() as each:
        each_loss, each_grads = _loss_and_grads(model, ids, autocast=True)
    # each layer: q/k/v and gate/up cast the input for the base matmul and again for the adapter (10 casts);
    # shared: one cast for the attention's input, one for the MLP's (other casts, e.g. the head's, are common)
    assert each.count - shared.count == 8 * layers
    assert torch.equal(shared_loss, each_loss)
    for name, grad in each_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
