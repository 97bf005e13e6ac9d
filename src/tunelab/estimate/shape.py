"""Count a model's parameters exactly without loading a weight: build it on torch's meta device from its
config.json, wrap it with the method's real PEFT config, and count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import MethodConfig
from tunelab.errors import ModelError
from tunelab.estimate.memory import ModelShape


def model_shape(folder: Path, method: MethodConfig) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.models import trusts_code

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trusts_code(folder))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
               if getattr(text, k, None) is None]
    if missing:
        raise ModelError(f"model.name: {folder}/config.json lacks {', '.join(missing)}; "
                         "tunelab estimate knows Llama-style decoders")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trusts_code(folder))
    head = model.get_output_embeddings()
    base_params = _count(model)
    linear_params = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and m is not head)
    head_params = head.weight.numel() if head is not None else 0
    if method.type == "full":
        trainable, adapter, adapted = base_params, 0, 0
    else:
        wrapped = _with_adapter(model, method, folder)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        adapter = _count(wrapped) - base_params
        adapted = _adapted_inputs(wrapped)
    return ModelShape(
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
        heads=text.num_attention_heads, kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab=text.vocab_size, base_params=base_params, linear_params=linear_params, head_params=head_params,
        trainable_params=trainable, adapter_params=adapter, adapted_inputs=adapted,
    )


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _with_adapter(model: Any, method: MethodConfig, folder: Path) -> Any:
    import torch
    from peft import get_peft_model

    from tunelab.train.methods import peft_config

    # Initializing prompt tuning from text reads the embeddings (none on meta); the count is the same.
    counted = method.model_copy(update={"prompt_init_text": None})
    with torch.device("meta"):
        return get_peft_model(model, peft_config(counted, folder))


def _adapted_inputs(model: Any) -> int:
    """Sum of in_features of the LoRA-wrapped Linears in the first decoder layer (every layer is alike)."""
    from peft.tuners.lora import LoraLayer

    per_layer: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ".layers." in name:
            layer = name.split(".layers.")[1].split(".")[0]
            per_layer[layer] = per_layer.get(layer, 0) + module.in_features
    return max(per_layer.values(), default=0)
