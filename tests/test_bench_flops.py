"""bench/model_flops.py: the LoRA-training FLOP count that the SFT benchmark's MFU figures rest on, checked
against torch's own count of a real forward and backward pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _model_flops():
    path = Path(__file__).resolve().parents[1] / "bench" / "model_flops.py"
    spec = importlib.util.spec_from_file_location("bench_model_flops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _tiny_lora_llama(rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # Grouped-query attention, an explicit head_dim unlike hidden / heads, untied sizes everywhere: a formula
    # that mixes up any two dimensions gives a different count.
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)
    # Eager attention runs as plain matmuls, which the counter sees (the CPU SDPA kernel has no FLOP formula).
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model, config


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_training_flops_equal_torch_count_of_a_forward_and_backward(rank: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    flops = _model_flops()
    model, config = _tiny_lora_llama(rank)
    lengths = [7, 19]  # one sequence each: attention is per example, so the count depends on sum(n^2)
    counter = FlopCounterMode(display=False)
    with counter:
        for n in lengths:
            ids = torch.randint(0, config.vocab_size, (1, n))
            model(input_ids=ids, labels=ids).loss.backward()
    expected = flops.lora_training_flops(config, rank, lengths, head_tokens=sum(lengths), causal=False)
    assert counter.get_total_flops() == expected.total
    # Only the adapters get weight gradients: the base and the (tied) head stay frozen.
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_causal_attention_counts_the_pairs_a_causal_model_needs() -> None:
    flops = _model_flops()
    _, config = _tiny_lora_llama(4)
    full = flops.lora_training_flops(config, 4, [10], head_tokens=3, causal=False)
    causal = flops.lora_training_flops(config, 4, [10], head_tokens=3, causal=True)
    assert causal.attention * 100 == full.attention * 55  # 10 * 11 / 2 of 10 * 10 pairs
    assert causal.total - causal.attention == full.total - full.attention
    per_token_head = 4 * config.hidden_size * config.vocab_size
    assert full.head == 3 * per_token_head


def test_mfu_is_model_flops_per_second_over_the_peak() -> None:
    flops = _model_flops()
    assert flops.mfu(flops_per_token=1e9, tokens_per_second=50, peak_gflops=200) == pytest.approx(0.25)
