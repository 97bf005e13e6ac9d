"""Fused RMSNorm and rotary embeddings compute transformers' functions (outputs and gradients), replace only the
layers whose form they match, and are gone again when training ends."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.fused_layers import RMSNormFunction, RotaryFunction, fused_layers, rms_norm_forward, rotary_function


def test_rms_norm_gradients_are_the_derivative():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-5), (x, weight))


def test_rotary_gradients_are_the_derivative():
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: RotaryFunction.apply(a, angles.cos(), angles.sin(), torch.float64),
                                    (x,))


def test_llama_rms_norm_same_output_and_gradient():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 16, requires_grad=True)
    grad = torch.randn(2, 7, 16)
    expected = norm(x)
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    fused = rms_norm_forward(norm)
    assert fused is not None
    got = fused(x)
    (got_dx,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_dx, expected_dx, rtol=1e-5, atol=1e-5)


def test_rms_norm_reads_its_weight_at_call_time():
    """Wrappers such as FSDP swap a module's parameters after set-up: the fused forward must use the new one."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8, eps=1e-6)
    fused = rms_norm_forward(norm)
    norm.weight = torch.nn.Parameter(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), LlamaRMSNorm.forward(norm, x), rtol=1e-6, atol=1e-6)


def test_other_norm_forms_are_left_alone():
    """Gemma's norm scales by 1 + w; a norm using another eps than the one it stores differs only at small scales
    (the check tries those too); a LayerNorm is not an RMSNorm."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert rms_norm_forward(Gemma3RMSNorm(16, eps=1e-6)) is None
    real = 1e-6

    class OtherEpsRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * hidden_states * torch.rsqrt(variance + real)  # not variance_epsilon

    assert rms_norm_forward(OtherEpsRMSNorm(16, eps=1e-2)) is None
    assert rms_norm_forward(torch.nn.LayerNorm(16)) is None


def _rope_inputs(dtype=torch.float32, tokens=9, head_dim=16):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim)
    positions = torch.arange(tokens)[None]
    q = torch.randn(1, 4, tokens, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 2, tokens, head_dim, dtype=dtype, requires_grad=True)
    cos, sin = LlamaRotaryEmbedding(config)(q.float(), positions)
    return q, k, cos, sin


def test_rotary_equals_llama_in_float32():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _rope_inputs()
    fused = rotary_function(apply_rotary_pos_emb, 16)
    assert fused is not None
    grads = torch.randn_like(q), torch.randn_like(k)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    expected_grads = torch.autograd.grad(expected, (q, k), grads)
    got = fused(q, k, cos, sin)
    got_grads = torch.autograd.grad(got, (q, k), grads)
    for e, g in zip((*expected, *expected_grads), (*got, *got_grads)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_rotary_under_bf16_autocast_rounds_once_like_attention_would():
    """bf16 q/k times float32 cos/sin is float32 in transformers, cast to bf16 by attention next: the fused
    function hands over bf16 directly, computed in float32 and rounded once, so it equals that cast but for
    the last bit of a few elements (float32 rounding order); a bf16 computation differed in a third of them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _rope_inputs(torch.bfloat16, tokens=64, head_dim=64)
    fused = rotary_function(apply_rotary_pos_emb, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = [t.to(torch.bfloat16) for t in apply_rotary_pos_emb(q, k, cos, sin)]
        got = fused(q, k, cos, sin)
    for e, g in zip(expected, got):
        assert g.dtype == torch.bfloat16
        assert (g != e).float().mean() < 0.001
        torch.testing.assert_close(g.float(), e.float(), rtol=0.008, atol=1e-3)
    # Backward: transformers casts each of the two products' gradients to bf16 before adding them (two roundings);
    # the fused backward rounds the float32 sum once, so it equals the exact gradient rounded to bf16.
    grads = torch.randn_like(expected[0]), torch.randn_like(expected[1])
    stock_grads = torch.autograd.grad(expected, (q, k), grads)
    got_grads = torch.autograd.grad(got, (q, k), grads)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exact = torch.autograd.grad(apply_rotary_pos_emb(q64, k64, cos.double(), sin.double()), (q64, k64),
                                tuple(g.double() for g in grads))
    for stock, g, e in zip(stock_grads, got_grads, exact):
        assert g.dtype == torch.bfloat16
        assert (g != e.to(torch.bfloat16)).float().mean() < 0.001
        assert (g.double() - e).abs().sum() < (stock.double() - e).abs().sum()


def test_other_rotary_forms_are_left_alone():
    """An interleaved rotation (GPT-J) is not the rotate-half form; Phi-3's partial rotary passes the check at
    full width and hands its partial calls back to its own function."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rotary

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rotate_every_two(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_every_two(q) * sin, k * cos + rotate_every_two(k) * sin

    assert rotary_function(interleaved, 16) is None
    assert rotary_function(lambda q, k: (q, k), 16) is None  # a signature it does not know
    fused = rotary_function(phi3_rotary, 16)
    assert fused is not None
    q, k, cos, sin = _rope_inputs()
    partial = cos[..., :8], sin[..., :8]
    for e, g in zip(phi3_rotary(q, k, *partial), fused(q, k, *partial)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3"])
def test_training_step_of_each_architecture_is_unchanged(arch, tmp_path):
    """Full fine-tuning (norm weights train too): the loss and every gradient equal transformers' path; the
    layers of another form (Gemma's 1 + w norms) keep theirs, and everything is restored afterwards."""
    import sys

    from transformers import AutoModelForCausalLM

    from tests.model_zoo import build_base_model

    folder = build_base_model(tmp_path / arch, arch=arch)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    home = sys.modules[type(model.model.layers[0].self_attn).__module__]
    own_rotary = home.apply_rotary_pos_emb
    expected_loss, expected_grads = step()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    with fused_layers(model) as replaced:
        assert home.apply_rotary_pos_emb is not own_rotary
        standard = 0 if arch == "gemma3" else len(norms)
        assert replaced == standard + 1
        assert sum("forward" in vars(m) for m in norms) == standard
        loss, grads = step()
    assert home.apply_rotary_pos_emb is own_rotary
    assert not any("forward" in vars(m) for m in norms)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_nested_use_swaps_once():
    from transformers.models.llama import modeling_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    own = modeling_llama.apply_rotary_pos_emb
    with fused_layers(model) as outer:
        swapped = modeling_llama.apply_rotary_pos_emb
        with fused_layers(model) as inner:
            assert modeling_llama.apply_rotary_pos_emb is swapped
            assert inner == 0 and outer == 3 + 1
    assert modeling_llama.apply_rotary_pos_emb is own


def test_training_uses_it_on_cpu_only_when_asked(tiny_config):
    from tunelab.train.fused_layers import fused_training_layers
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with fused_training_layers(tiny_config, "cpu", model) as replaced:
        assert replaced == 4
    with fused_training_layers(tiny_config, "cuda", model) as replaced:
        assert replaced == 0
    tiny_config.train.fused_norm_rope = False
    with fused_training_layers(tiny_config, "cpu", model) as replaced:
        assert replaced == 0
