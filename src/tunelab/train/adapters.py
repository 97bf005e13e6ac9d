"""Build the PEFT adapter for `method` and attach it to a loaded base model."""

from __future__ import annotations

from typing import Any

from tunelab.config import MethodConfig


def attach_adapter(model: Any, method: MethodConfig) -> Any:
    """Wrap `model` in a PeftModel with a fresh, trainable adapter; the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        # "all-linear" adapts every linear projection except the output head (PEFT's own rule).
        target_modules=method.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
