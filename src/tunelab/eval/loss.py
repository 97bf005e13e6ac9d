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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ))
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
