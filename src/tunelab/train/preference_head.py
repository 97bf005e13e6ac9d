"""ORPO and SimPO without the full-vocabulary logits.

TRL's experimental ORPOTrainer and CPOTrainer (which runs SimPO) ask the model for the logits of every position
of every sequence of a batch, [2 x pairs, width, vocab] (4,700 tokens x a 49k vocabulary x 4 bytes is ~0.9 GB),
and keep them, their log-softmax and its gradient alive until backward. From all that they read three things:
each answer token's log-prob (summed or averaged per sequence), the chosen sequences' NLL, and the logits' mean
for two logged metrics. `LogitsFreeORPO` / `LogitsFreeCPO` compute exactly those in `concatenated_forward`:

- the batch's sequences go in as one padding-free row (per-example attention, as train/preference_packing.py
  does for DPO), and the decoder's hidden states come back without the head;
- the log-prob of each next token that a loss reads comes from tunelab.losses' chunked head: one chunk of
  logits at a time, each row's gradient computed in the same pass (tests/train/test_preference_head.py: equal
  to TRL's own forward in value and in every LoRA gradient);
- a position's logits sum to its hidden state times the head's column sum, so the logged means need no logits.

TRL's losses, rewards and metrics then run unchanged on those numbers. Where the shortcut does not hold (a head
that trains or is not a plain Linear, logit scaling or soft-capping, an encoder-decoder, a MoE aux loss, a
batch that is not right-padded) TRL's own forward runs, packed by preference_packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.losses import frozen_plain_head, linear_cross_entropy_rows
from tunelab.train.attention import padding_free_attention
from tunelab.train.preference_packing import PaddingFreeLogits, pack, right_padded


@dataclass(frozen=True)
class Readout:
    """What a trainer's concatenated_forward reads from the logits."""

    nll: str | None  # the chosen sequences' NLL over "all" their tokens (ORPO), the "answer" (CPO), or None
    average: bool  # per-sequence log-prob: mean over answer tokens (True) or their sum
    metric_drops_last: bool  # the logged logits' mean leaves out each row's last position (ORPO's slice)


def preference_readout(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                       chosen_rows: int, readout: Readout) -> tuple[torch.Tensor, ...]:
    """TRL's concatenated_forward outputs for a right-padded batch of chosen then rejected sequences:
    (chosen log-probs, rejected log-probs, chosen logits' mean, rejected logits' mean, chosen NLL).

    The two means are 0-d tensors (TRL only logs `.mean()` of what stands there); positions that were padding
    count as zero logits, as in preference_packing's padded layout."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    packed, packed_labels, packed_positions, _ = pack(input_ids, mask, labels)
    row, positions = packed[0], packed_positions[0]
    sequences_count = input_ids.shape[0]
    with padding_free_attention(model):
        hidden = base.get_decoder()(input_ids=packed, position_ids=packed_positions, use_cache=False)
    hidden = hidden.last_hidden_state[0]

    # Row position k predicts token k + 1 when both belong to the same sequence (a sequence starts at position 0;
    # `pack` never makes a sequence's first token a target).
    owner = torch.cumsum(positions == 0, dim=0) - 1
    same, predictor = positions[1:] != 0, owner[:-1]
    answer = packed_labels[0, 1:] != IGNORE_INDEX
    chosen = predictor < chosen_rows
    nll_rows = {"all": same & chosen, "answer": answer & chosen, None: torch.zeros_like(same)}[readout.nll]
    needed = answer | nll_rows
    weight = base.get_output_embeddings().weight
    log_probs = -linear_cross_entropy_rows(hidden[:-1][needed], weight, row[1:][needed])

    counted, who = answer[needed], predictor[needed]
    sequences = log_probs.new_zeros(sequences_count).index_add(0, who[counted], log_probs[counted])
    if readout.average:
        sequences = sequences / torch.bincount(who[counted], minlength=sequences_count)
    nll = -log_probs[nll_rows[needed]].mean() if readout.nll else torch.zeros((), device=row.device)

    with torch.no_grad():  # logged only: sum of a position's logits = hidden . column sum of the head
        logit_sums = hidden.float() @ weight.float().sum(dim=0)
        width = input_ids.shape[1] - (1 if readout.metric_drops_last else 0)
        shown = positions < width
        means = []
        for part, rows in ((owner < chosen_rows, chosen_rows), (owner >= chosen_rows, sequences_count - chosen_rows)):
            means.append(logit_sums[part & shown].sum() / max(rows * width * weight.shape[0], 1))
    return sequences[:chosen_rows], sequences[chosen_rows:], means[0], means[1], nll


class _LogitsFree(PaddingFreeLogits):
    """Mixin: TRL's concatenated_forward from hidden states and the chunked head (see the module docstring)."""

    def _readout(self) -> Readout:
        raise NotImplementedError

    def _padding_value(self) -> int:
        raise NotImplementedError

    def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        unwrapped = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        if (self.is_encoder_decoder or self.aux_loss_enabled  # type: ignore[attr-defined]
                or not frozen_plain_head(unwrapped)):
            return super().concatenated_forward(model, batch)  # type: ignore[misc]
        both = self.concatenated_inputs(batch, is_encoder_decoder=False,  # type: ignore[attr-defined]
                                        padding_value=self._padding_value(),
                                        device=self.accelerator.device)  # type: ignore[attr-defined]
        mask = both["concatenated_attention_mask"]
        if mask.shape[0] < 2 or not right_padded(mask):
            return super().concatenated_forward(model, batch)  # type: ignore[misc]
        # Accelerate applies mixed precision around the wrapped model's forward, which the decoder call skips.
        with self.accelerator.autocast():  # type: ignore[attr-defined]
            return preference_readout(unwrapped, both["concatenated_input_ids"], mask,
                                      both["concatenated_labels"], batch["chosen_labels"].shape[0],
                                      self._readout())


class LogitsFreeORPO(_LogitsFree):
    """For trl.experimental.orpo.ORPOTrainer: NLL over the chosen sequences' every token, mean log-probs."""

    def _readout(self) -> Readout:
        return Readout(nll="all", average=True, metric_drops_last=True)

    def _padding_value(self) -> int:
        return self.padding_value  # type: ignore[attr-defined,no-any-return]


class LogitsFreeCPO(_LogitsFree):
    """For trl.experimental.cpo.CPOTrainer (SimPO and CPO's other losses)."""

    def _readout(self) -> Readout:
        return Readout(nll="answer" if self.cpo_alpha != 0 else None,  # type: ignore[attr-defined]
                       average=self.loss_type in ("ipo", "simpo"),  # type: ignore[attr-defined]
                       metric_drops_last=False)

    def _padding_value(self) -> int:
        return self.pad_token_id  # type: ignore[attr-defined,no-any-return]
