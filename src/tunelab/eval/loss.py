"""Token-weighted eval loss and perplexity over the labelled (assistant) tokens."""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.train.collate import PaddingCollator


@torch.no_grad()
def mean_token_loss(model: Any, examples: list[dict[str, Any]], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per target token over all `examples` (not a mean of per-batch means)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        # The model's own loss (mean over this batch's targets) handles methods that add virtual tokens.
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(loss) * targets
        count += targets
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
