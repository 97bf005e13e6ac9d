"""Packing: several tokenized examples per row, with position ids that restart for each example.

With `attention_mask` left out and restarting `position_ids`, transformers builds a block-diagonal causal
mask, so attention never crosses from one example into the next: the loss of a packed batch equals the
loss of the same examples unpacked (a test proves it). Packing removes padding, the largest waste when
example lengths vary as much as real instruction data does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.train.collate import concat_examples, pad_right, replay_flags, with_example_index, with_replay_mask


def pack_examples(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Best-fit-decreasing bin packing of examples into rows of at most `max_length` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        size = len(examples[i]["input_ids"])
        if size > max_length:
            raise ValueError(f"example {examples[i].get('id')} has {size} tokens, more than max_length {max_length}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, b = free.pop(slot)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return [_concat([examples[i] for i in members]) for members in bins]


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    input_ids, labels, positions = concat_examples(parts)
    row = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "ids": [p.get("id") for p in parts]}
    if any(p.get("replay") for p in parts):
        row["replay_tokens"] = [f for p in parts for f in replay_flags(p)]
    return row


@dataclass
class PackedCollator:
    """Batches packed rows. Padding forms its own position-0 segment and carries no labels."""

    pad_token_id: int
    tokens_seen: int = field(default=0, init=False)
    targets_seen: int = field(default=0, init=False)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, lengths = pad_right(batch, self.pad_token_id)
        longest = ids.shape[1]
        positions = torch.zeros((len(batch), longest), dtype=torch.long)
        for r, (row, n) in enumerate(zip(batch, lengths)):
            positions[r, :n] = torch.tensor(row["position_ids"])
            positions[r, n:] = torch.arange(longest - n)
        self.tokens_seen += sum(lengths)
        self.targets_seen += int((labels != IGNORE_INDEX).sum())
        out = with_example_index({"input_ids": ids, "labels": labels, "position_ids": positions}, batch)
        return with_replay_mask(out, batch, longest)
