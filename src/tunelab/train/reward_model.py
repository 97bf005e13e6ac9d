"""Reward models: a sequence-scoring head on the base model, trained on preference pairs with LoRA.

The run folder holds a standard PEFT adapter (LoRA + the score head); `load_reward_model` gives back a
plain model that TRL's GRPO accepts as a reward, and `pairwise_accuracy` is its evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunelab.artifacts import RunPaths
from tunelab.chat import TemplateSetup, render_conversation
from tunelab.config import ModelConfig, RunConfig
from tunelab.errors import RunFolderError
from tunelab.models import Precision, load_tokenizer, resolve_model
from tunelab.vocab import attach_adapter, fit_embeddings, trainable_tokens


def build_reward_model(cfg: RunConfig, base_folder: Path, precision: Precision, tokenizer: Any,
                       template: TemplateSetup | None = None) -> Any:
    """The base with a score head and LoRA; `tokenizer` is the run's (its chat template's added marker tokens, a
    base model given a template, get embedding rows that train, as in build_trainable)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        base_folder, num_labels=1, dtype=precision.weights_dtype, pad_token_id=tokenizer.pad_token_id
    ).to(precision.device)
    fit_embeddings(model, len(tokenizer))
    new_ids = tokenizer.convert_tokens_to_ids(list(template.added_tokens)) if template else []
    m = cfg.method
    # SEQ_CLS makes PEFT train and save the new score head alongside the LoRA weights.
    config = LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=m.target_modules,
                        task_type="SEQ_CLS", **trainable_tokens(model, new_ids))
    return get_peft_model(model, config)


def load_reward_model(run_dir: Path) -> Any:
    """A trained reward model, merged into a plain model (what GRPO's reward_funcs accept)."""
    from transformers import AutoModelForSequenceClassification

    run = RunPaths(run_dir)
    adapter, config_path = run.adapter, run.adapter_config
    if not config_path.is_file() or json.loads(config_path.read_text()).get("task_type") != "SEQ_CLS":
        raise RunFolderError(f"{run_dir}: not a reward-model run (train one with objective.type: reward)")
    spec = json.loads(config_path.read_text())
    # The adapter names its base portably (Hub ID and commit, bundled name, or path); resolve that to a folder.
    base = resolve_model(ModelConfig(name=spec["base_model_name_or_path"], revision=spec.get("revision")))
    tokenizer = load_tokenizer(adapter)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id)
    return attach_adapter(model, adapter).merge_and_unload().eval()


@torch.no_grad()
def score(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[float]:
    texts = [render_conversation(tokenizer, c) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().tolist()


def pairwise_accuracy(model: Any, tokenizer: Any, records: list[Any]) -> float:
    """Share of preference pairs whose chosen answer scores above the rejected one."""
    pairs = [r for r in records if r.kind == "preference"]
    if not pairs:
        return float("nan")
    chosen = score(model, tokenizer, [[*r.messages, {"role": "assistant", "content": r.chosen}] for r in pairs])
    rejected = score(model, tokenizer, [[*r.messages, {"role": "assistant", "content": r.rejected}] for r in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
