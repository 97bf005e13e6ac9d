"""Padding-free preference batches: TRL's DPO, KTO, ORPO and SimPO forwards, run on one row without padding.

TRL 1.16 pads every sequence of a preference batch (prompt + chosen and prompt + rejected of each pair) to the
longest, and its own `padding_free` option for DPO is switched off ("temporarily unavailable"). With long-tailed
lengths most of a padded batch is padding, and every activation of every layer is kept for it.

TRL calls the model as `model(input_ids, attention_mask, labels=..., fused_lm_head=True)` and gets per-token
log-probs back (its fused LM head: no full-vocabulary logits). `pack_fused_calls` wraps that forward: the real
tokens of the right-padded batch go in as one row with position ids restarting per sequence (tunelab's
per-example attention, train/attention.py, keeps sequences apart), and every per-token output is scattered back
to the padded layout TRL expects, zero where there was padding, as TRL's own output is where the label is
-100. Losses, rewards and metrics are then TRL's own, computed on the same numbers.

ORPO and SimPO (TRL's experimental ORPOTrainer and CPOTrainer) call `model(input_ids, attention_mask=...)` for
full logits. `pack_logits_calls` runs such a call on one row as well and scatters the logits back to
[batch, width, vocab], zero at padding. TRL reads logits at padding only through labels of -100 (ignored),
so losses and rewards are unchanged; its logged `logits/chosen` and `logits/rejected` means, taken over the
padded tensor, count zeros where TRL's would count the model's logits on pad tokens.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.losses import frozen_plain_head, linear_cross_entropy_rows
from tunelab.train.attention import padding_free_attention

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
_MARK = "_tunelab_packed_forward"
_LOGITS_MARK = "_tunelab_packed_logits_forward"
_UNPACKABLE = ("labels", "position_ids", "inputs_embeds", "past_key_values", "shift_labels")


def pack_fused_calls(model: Any, own_head: bool = False) -> None:
    """Make `model`'s fused-LM-head calls padding-free (once; a second call does nothing).

    `model` is the model TRL gave a fused LM head (the base under a PEFT wrapper). Calls without
    `fused_lm_head=True`, with one row, pre-shifted labels or a mask that is not right padding go through
    unchanged. With `own_head`, the packed call's per-token outputs come from tunelab's chunked head
    (`chunked_head_outputs`) instead of TRL's."""
    if getattr(model, _MARK, False):
        return
    fused = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        input_ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        if (not fused_lm_head or args or input_ids is None or mask is None or labels is None
                or kwargs.get("shift_labels") is not None or kwargs.get("position_ids") is not None
                or kwargs.get("inputs_embeds") is not None or input_ids.shape[0] == 1 or not right_padded(mask)):
            return fused(*args, fused_lm_head=fused_lm_head, **kwargs)
        row, row_labels, positions, keep = pack(input_ids, mask, labels)
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels")}
        with padding_free_attention(self):
            # (PEFT's wrapper passes output_attentions=None and the like; anything set goes to TRL's head)
            if own_head and all(v is None for k, v in rest.items() if k not in ("use_cache", "return_dict")):
                out = chunked_head_outputs(self, row, row_labels, positions)
            else:
                out = fused(input_ids=row, labels=row_labels, position_ids=positions, fused_lm_head=True, **rest)
        return unpack(out, keep)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)


def chunked_head_outputs(model: Any, row: torch.Tensor, row_labels: torch.Tensor, positions: torch.Tensor) -> Any:
    """What TRL's fused LM head returns for one row (log-probs with their gradient; entropy, mean logit and
    top-1 for its logs), from the decoder's hidden states at the target positions only, through
    tunelab.losses' chunked head (128 rows of logits at a time, each row's gradient computed in the same pass).

    On CPU, TRL's head scores every position of the row, prompts included, and recomputes each tile of logits
    in backward; here only the answers' positions are scored, once. Needs a frozen plain head
    (tunelab.losses.supports_chunked_loss)."""
    from trl.trainer.utils import FusedCausalLMOutput

    hidden = model.get_decoder()(input_ids=row, position_ids=positions, use_cache=False).last_hidden_state[0, :-1]
    targets = row_labels[0, 1:]
    mask = targets != IGNORE_INDEX
    stats: dict[str, torch.Tensor] = {}
    losses = linear_cross_entropy_rows(hidden[mask], model.get_output_embeddings().weight, targets[mask],
                                       stats=stats)

    def spread(values: torch.Tensor) -> torch.Tensor:  # [targets] -> [1, row - 1], zero where the label is -100
        return values.new_zeros(mask.shape).masked_scatter(mask, values)[None, :]

    log_probs = spread(-losses)
    return FusedCausalLMOutput(loss=losses.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                               entropy=spread(stats["entropy"]), mean_logits=spread(stats["mean_logits"]),
                               is_top1=spread(stats["is_top1"]), label_mask=mask[None, :])


def pack_logits_calls(model: Any) -> None:
    """Make `model`'s full-logits calls `model(input_ids, attention_mask=mask, ...)` padding-free (once).

    Calls with labels, position ids, embeddings, a cache, one row or a mask that is not right padding go
    through unchanged."""
    if getattr(model, _LOGITS_MARK, False):
        return
    plain = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        input_ids = args[0] if len(args) == 1 else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if (len(args) > 1 or (args and "input_ids" in kwargs) or input_ids is None or mask is None
                or kwargs.get("fused_lm_head") or any(kwargs.get(k) is not None for k in _UNPACKABLE)
                or input_ids.shape[0] == 1 or not right_padded(mask)):
            return plain(*args, **kwargs)
        keep = mask.bool()
        lengths = keep.sum(dim=1).tolist()
        positions = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])[None, :]
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        with padding_free_attention(self):
            out = plain(input_ids=input_ids[keep][None, :], position_ids=positions, **rest)
        logits = out.logits
        padded = logits.new_zeros((*input_ids.shape, logits.shape[-1]))
        out.logits = padded.masked_scatter_(keep[..., None], logits[0])
        return out

    model.forward = types.MethodType(forward, model)
    setattr(model, _LOGITS_MARK, True)


def right_padded(mask: torch.Tensor) -> bool:
    """Every row's ones come first (TRL pads preference batches on the right)."""
    lengths = mask.sum(dim=1, keepdim=True)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths)).all())


def pack(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of the real tokens, its labels (each sequence's first token is never a target: it would be
    predicted from the previous sequence), position ids restarting per sequence, and `keep`: which positions
    of the padded, shifted layout [batch, width - 1] the row's shifted outputs fill, in order."""
    keep_tokens = mask.bool()
    lengths = keep_tokens.sum(dim=1)
    row = input_ids[keep_tokens][None, :]
    positions = torch.cat([torch.arange(int(n), device=input_ids.device) for n in lengths])[None, :]
    row_labels = labels[keep_tokens].clone()
    row_labels[positions[0] == 0] = IGNORE_INDEX
    return row, row_labels[None, :], positions, keep_tokens[:, 1:]


def unpack(out: Any, keep: torch.Tensor) -> Any:
    """Scatter the row's shifted per-token outputs [1, total - 1] back to the padded layout [batch, width - 1].

    Row position k predicts row token k + 1; the last position of each sequence predicts the next sequence's
    first token and is dropped, which leaves exactly the positions `keep` marks, in the same order."""
    lengths = keep.sum(dim=1) + 1
    ends = torch.cumsum(lengths, dim=0) - 1  # row index of each sequence's last token
    inside = torch.ones(int(lengths.sum()) - 1, dtype=torch.bool, device=keep.device)
    inside[ends[:-1]] = False
    for name in PER_TOKEN_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, value.new_zeros(keep.shape).masked_scatter(keep, value[0][inside]))
    return out


class PaddingFreeLogits:
    """Mixin for TRL's experimental ORPOTrainer and CPOTrainer (SimPO): their full-logits calls go padding-free."""

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        pack_logits_calls(model.get_base_model() if hasattr(model, "get_base_model") else model)
        return super().compute_loss(*args, **kwargs)  # type: ignore[misc]


class PaddingFreePreference:
    """Mixin for TRL's DPOTrainer and KTOTrainer: their fused-LM-head calls go padding-free.

    TRL adds the fused head in its `__init__` and, with precomputed reference log-probs, runs the reference pass
    there too, so the wrapper goes on at the first of those passes rather than after construction."""

    own_head = False  # tunelab's chunked head instead of TRL's fused one (set by train/preference.py)

    def _pack_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # WPO's weights need log(sum p^2), which the chunked head does not compute.
        own = self.own_head and not getattr(self, "use_weighting", False) and frozen_plain_head(base)
        pack_fused_calls(base, own_head=own)

    def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
        self._pack_model()
        return super()._precompute_ref_logps(*args, **kwargs)  # type: ignore[misc]

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        self._pack_model()
        return super().compute_loss(*args, **kwargs)  # type: ignore[misc]
