"""The eval loss never materializes full logits where it can avoid it, and gives the model's own loss."""

from __future__ import annotations

import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.losses import mean_token_loss


def _examples(vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for n in (7, 19, 4, 12, 30):
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return rows


def _reference(model, examples: list[dict], pad: int) -> float:
    """Token-weighted mean of the model's own loss, one example at a time (no padding involved)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            targets = sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)
            total += float(out.loss) * targets
            count += targets
    return total / count


def test_matches_the_models_own_loss(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    examples = _examples(model.config.vocab_size)
    expected = _reference(model, examples, tiny_tokenizer.pad_token_id)
    got = mean_token_loss(model, examples, tiny_tokenizer.pad_token_id, batch_size=3)
    assert abs(got - expected) < 1e-4 * expected


def test_prompt_tuning_keeps_the_models_own_path(tiny_model_dir, tiny_tokenizer):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    examples = _examples(model.config.vocab_size)
    expected = _reference(model, examples, tiny_tokenizer.pad_token_id)
    got = mean_token_loss(model, examples, tiny_tokenizer.pad_token_id, batch_size=3)
    assert abs(got - expected) < 1e-4 * expected
