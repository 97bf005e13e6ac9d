"""Token-weighted eval loss and perplexity over the labelled (assistant) tokens."""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.train.collate import PaddingCollator


@torch.no_grad()
def mean_token_loss(model: Any, examples: list[dict[str, Any]], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per target token over all `examples` (not a mean of per-batch means).

    Where the chunked loss applies, the logits are never materialized in full: a batch of 8 rows of 600
    tokens over a 49k vocabulary would otherwise hold ~1 GB of fp32 logits plus their log-softmax, more than
    the training step itself (this pass runs right after training, so it would set the run's peak memory)."""
    from tunelab.train.loss import chunked_causal_lm_loss, supports_chunked_loss

    if not examples:
        return float("nan")
    chunked = supports_chunked_loss(model) and not _adds_virtual_tokens(model)
    was_training = model.training
    model.eval()
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if chunked:
            total += float(chunked_causal_lm_loss(model, batch, num_items_in_batch=1))  # divided by 1: the sum
        else:
            # The model's own loss (mean over this batch's targets) handles methods that add virtual tokens.
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            total += float(model(**inputs).loss) * targets
        count += targets
    model.train(was_training)
    return total / max(count, 1)


def _adds_virtual_tokens(model: Any) -> bool:
    """Prompt/prefix tuning: the decoder alone would miss the virtual tokens PEFT's wrapper adds."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
