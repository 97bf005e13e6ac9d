"""Turn tokenized examples into padded batches, counting the real (non-pad) tokens that pass through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.chat import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Right-pads a list of {"input_ids", "labels"} to the longest in the batch.

    Padding positions get attention 0 and label IGNORE_INDEX, so the pad id never matters for the loss.
    `tokens_seen` / `targets_seen` count non-pad and labelled tokens, for tokens/s reporting.
    """

    pad_token_id: int
    tokens_seen: int = field(default=0, init=False)
    targets_seen: int = field(default=0, init=False)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, lengths = pad_right(batch, self.pad_token_id)
        mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        self.tokens_seen += sum(lengths)
        self.targets_seen += int((labels != IGNORE_INDEX).sum())
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return with_replay_mask(with_example_index(out, batch), batch, ids.shape[1])


def pad_right(batch: list[dict[str, Any]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """input_ids padded with pad_token_id and labels with IGNORE_INDEX to the longest row; row lengths."""
    lengths = [len(ex["input_ids"]) for ex in batch]
    ids = torch.full((len(batch), max(lengths)), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), max(lengths)), IGNORE_INDEX, dtype=torch.long)
    for row, (ex, n) in enumerate(zip(batch, lengths)):
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
    return ids, labels, lengths


def replay_flags(part: dict[str, Any]) -> list[int]:
    """1 for each token of a rehearsal row (data.replay), 0 for the task's; a packed row carries its own."""
    if "replay_tokens" in part:
        return part["replay_tokens"]
    return [int(bool(part.get("replay")))] * len(part["input_ids"])


def with_replay_mask(out: dict[str, torch.Tensor], rows: list[dict[str, Any]], width: int) -> dict[str, torch.Tensor]:
    """Add `replay_mask` (rows x width, right-padded with 0) when the batch holds rehearsal tokens, so the
    trainer can log their loss apart from the task's."""
    flags = [replay_flags(row) for row in rows]
    if any(any(f) for f in flags):
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, f in enumerate(flags):
            mask[r, :len(f)] = torch.tensor(f, dtype=torch.bool)
        out["replay_mask"] = mask
    return out


def with_example_index(out: dict[str, torch.Tensor], batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Carry each row's position in the training set, so a NaN loss can name its examples."""
    if all("index" in ex for ex in batch):
        out["example_index"] = torch.tensor([ex["index"] for ex in batch])
    return out


@dataclass
class PaddingFreeCollator:
    """Puts a whole batch into one row, examples end to end, with position ids that restart per example.

    The batch holds the same examples as PaddingCollator's (same steps, same loss), but not one pad token.
    The restarting position ids keep examples apart: tunelab's training attention (train/attention.py)
    runs each example on its own; stock transformers builds a block-diagonal causal mask from them
    (masking_utils.find_packed_sequence_indices); flash-attention kernels do variable-length attention.
    The first token of each example is never a target (it would be predicted from the previous example).
    """

    pad_token_id: int  # unused (nothing is padded); kept so every collator is built the same way
    tokens_seen: int = field(default=0, init=False)
    targets_seen: int = field(default=0, init=False)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = concat_examples(batch)
        labels_t = torch.tensor([labels])
        self.tokens_seen += len(ids)
        self.targets_seen += int((labels_t != IGNORE_INDEX).sum())
        out = {"input_ids": torch.tensor([ids]), "labels": labels_t, "position_ids": torch.tensor([positions])}
        row = {"input_ids": ids, "replay_tokens": [f for part in batch for f in replay_flags(part)]}
        return with_replay_mask(with_example_index(out, batch), [row], len(ids))


def concat_examples(parts: list[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """Examples end to end: input ids, labels and position ids that restart for each example (a part that
    is already a packed row keeps its own). The first token of each part is never a target: predicting it
    would use the previous example."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for part in parts:
        ids += part["input_ids"]
        labels += [IGNORE_INDEX, *part["labels"][1:]]
        positions += part.get("position_ids") or range(len(part["input_ids"]))
    return ids, labels, positions
