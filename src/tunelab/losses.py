"""Causal-LM loss without the full-vocabulary logits.

The stock loss projects every position of every row onto the whole vocabulary (49k for SmolLM2) and keeps
those logits, their float32 copy and their gradient alive until backward: for a batch of 8 x 600 tokens
that is several GB, most of it for prompt and padding positions that are never targets. Here the decoder's
hidden states are taken at the target positions only, and the output projection + cross-entropy run over
them in chunks, with each chunk's gradient computed in the same pass (as Liger's fused kernel does on GPU):
at most one chunk of logits exists at a time, nothing is recomputed, and the loss and gradients equal the
stock ones within floating-point tolerance (tests/train/test_loss.py).

Training uses the chunked loss per step; eval and training's final val pass use `mean_token_loss`, which
reuses it: one module for both, so neither train nor eval imports the other for a loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.chat import IGNORE_INDEX
from tunelab.kept_casts import kept_cast
from tunelab.train.collate import PaddingCollator

CHUNK_TOKENS = 1024  # 1024 x 49k float32 logits = 200 MB: the most this loss holds at once
# On CPU with a frozen head, chunks of at most this many float32 logits (24 MiB; 128 rows of a 49k vocabulary):
# glibc hands any freed block over 32 MiB back to the kernel, so a 1024-row chunk's buffers were fresh pages
# every step (page faults cost more than the arithmetic on them); smaller blocks are reused from the heap.
# Measured (`python bench/chunked_loss.py`: 628 target rows, forward + backward, 3 rounds): 64 rows 327-378 ms,
# 128: 270-411, 256: 307-446, 1024: 339-525, 128 the fastest in each round; fewer rows make the matmuls slower.
CPU_CHUNK_ELEMENTS = 6 * 2**20


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T, targets) per row, or summed over rows; gradients computed chunk by chunk
    in forward.

    A row's loss depends on its own hidden state only, so its gradient with respect to that state is computed
    while its logits exist and kept ([N, d], small); backward scales it by the incoming gradient of the row
    (per-row losses) or of the sum. A trained head's gradient is a sum over rows, so it is accumulated here for
    the summed loss only; per-row losses need a frozen head."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype, with_grads: bool, per_row: bool,
                stats: dict[str, torch.Tensor] | None) -> torch.Tensor:
        w = kept_cast(weight, compute_dtype) if not weight.requires_grad else weight.to(compute_dtype)
        # Under no_grad (evaluation) neither gradient is needed: only the loss is computed.
        grad_hidden = torch.empty_like(hidden) if with_grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads and weight.requires_grad else None
        losses = torch.empty(hidden.shape[0] if per_row else 0, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(compute_dtype)
            y = targets[start : start + chunk]
            rows = torch.arange(len(y), device=y.device)
            logits = F.linear(h, w)  # the same rounding as the model's head under autocast
            picked = logits[rows, y].float()
            if stats is not None:  # logged only (no gradient): read before the logits are overwritten
                stats["mean_logits"][start : start + chunk] = logits.mean(dim=-1, dtype=torch.float32)
                stats["is_top1"][start : start + chunk] = logits.argmax(dim=-1) == y
            # log-sum-exp as torch.logsumexp computes it (max, then the sum of exp of the difference), in
            # float32 and in place: its exponentials are the softmax's numerators, kept for the gradient
            exps = logits.float()  # a copy in compute precision below float32, else the logits themselves
            top = exps.amax(dim=-1, keepdim=True)
            exps.sub_(top)
            shifted = exps.clone() if stats is not None else None  # logit - top, for the entropy
            sums = exps.exp_().sum(dim=-1, keepdim=True)
            row_losses = (top + sums.log()).squeeze(1).sub_(picked)
            if shifted is not None:  # entropy = log-sum-exp - sum(p * logit) = log(sums) - sum(p * (logit - top))
                stats["entropy"][start : start + chunk] = (sums.log() - (exps * shifted).sum(-1, keepdim=True)
                                                           / sums).squeeze(1)
            if per_row:
                losses[start : start + chunk] = row_losses
            else:
                total += row_losses.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss of a row)/d(its logits) = softmax - one_hot, written over the logits in compute precision.
            grad_logits = torch.mul(exps, sums.reciprocal_(), out=logits)
            grad_logits[rows, y] -= 1.0
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        empty = torch.empty(0)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else empty,
                              grad_weight if grad_weight is not None else empty)
        ctx.weight_dtype, ctx.per_row = weight.dtype, per_row
        ctx.hidden_grad, ctx.weight_grad = grad_hidden is not None, grad_weight is not None
        return losses if per_row else total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        dw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.weight_grad else None
        scale = grad_output[:, None] if ctx.per_row else grad_output
        dh = grad_hidden * scale.to(grad_hidden.dtype) if ctx.hidden_grad else None
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """Sum of cross-entropy losses of `hidden` [N, d] projected by `weight` [V, d] against `targets` [N],
    never holding more than `chunk` rows of logits (default: `chunk_rows`). Honors an enclosing autocast like
    the model's head does."""
    return _linear_cross_entropy(hidden, weight, targets, chunk, per_row=False)


def linear_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int | None = None,
                              stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Each row's cross-entropy [N] (float32; minus the log-prob of its target), as `linear_cross_entropy_sum`
    computes it. The head must be frozen: its gradient would depend on the rows' gradients, unknown in forward.

    With `stats` (an empty dict), it is filled with each row's logged figures, without gradients: "entropy" of the
    next-token distribution, "mean_logits" over the vocabulary, "is_top1" (the target is the first argmax)."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("per-row cross-entropy needs a frozen output head")
    if stats is not None:
        rows, device = hidden.shape[0], hidden.device
        stats.update(entropy=torch.empty(rows, device=device), mean_logits=torch.empty(rows, device=device),
                     is_top1=torch.empty(rows, dtype=torch.bool, device=device))
    return _linear_cross_entropy(hidden, weight, targets, chunk, per_row=True, stats=stats)


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None,
                          per_row: bool, stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with_grads = torch.is_grad_enabled()  # read here: inside forward, grad mode is always off
    if chunk is None:
        chunk = chunk_rows(weight.shape[0], device, weight.requires_grad)
    with torch.autocast(device_type=device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, compute_dtype, with_grads, per_row, stats)


def chunk_rows(vocab: int, device: str, head_trains: bool) -> int:
    """Rows of logits per chunk: CHUNK_TOKENS, or on CPU with a frozen head as many as fit CPU_CHUNK_ELEMENTS
    (a trained head accumulates its gradient once per chunk, a full [V, d] pass: few chunks there)."""
    if device != "cpu" or head_trains:
        return CHUNK_TOKENS
    return max(16, min(CHUNK_TOKENS, CPU_CHUNK_ELEMENTS // max(vocab, 1)))


def supports_chunked_loss(model: Any) -> bool:
    """Models whose logits are exactly `lm_head(decoder(x))`: a plain bias-free Linear head, no logit
    scaling or soft-capping (those would have to be repeated here), reachable as decoder + head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if config is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    return hasattr(base, "get_decoder") and base.get_decoder() is not None


def frozen_plain_head(model: Any) -> bool:
    """The chunked head can give `model`'s per-row log-probs (linear_cross_entropy_rows): a plain head
    (`supports_chunked_loss`) that does not train."""
    if not supports_chunked_loss(model):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not base.get_output_embeddings().weight.requires_grad


def chunked_causal_lm_loss(model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None,
                           replay_mask: torch.Tensor | None = None,
                           parts: dict[str, float] | None = None) -> torch.Tensor:
    """The causal-LM loss of `inputs` (input_ids, labels, and attention_mask or position_ids), normalized
    like the model's own: by `num_items_in_batch` when given (gradient accumulation), else by this batch's
    target count. The decoder runs as usual (LoRA layers, checkpointing and NEFTune hooks included).

    With `replay_mask` (True on rehearsal tokens), the summed losses and target counts of task and replay
    tokens are added to `parts` ({task,replay}_{loss_sum,targets}); the total is the same sum."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    decoder_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = base.get_decoder()(**decoder_inputs, use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    weight = base.get_output_embeddings().weight
    if replay_mask is None:
        total = linear_cross_entropy_sum(hidden[:, :-1][keep], weight, shifted[keep])
    else:
        replay = replay_mask[:, 1:].to(keep.device)
        total = hidden.new_zeros((), dtype=torch.float32)
        for name, chosen in (("task", keep & ~replay), ("replay", keep & replay)):
            part = linear_cross_entropy_sum(hidden[:, :-1][chosen], weight, shifted[chosen])
            total = total + part
            if parts is not None:
                parts[f"{name}_loss_sum"] = parts.get(f"{name}_loss_sum", 0.0) + float(part.detach())
                parts[f"{name}_targets"] = parts.get(f"{name}_targets", 0.0) + float(chosen.sum())
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor


@torch.no_grad()
def mean_token_loss(model: Any, examples: list[dict[str, Any]], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per target token over all `examples` (not a mean of per-batch means).

    Where the chunked loss applies, the logits are never materialized in full: a batch of 8 rows of 600
    tokens over a 49k vocabulary would otherwise hold ~1 GB of fp32 logits plus their log-softmax, more than
    the training step itself (this pass runs right after training, so it would set the run's peak memory)."""
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
