"""Which training path a run takes, decided in one place.

Padding-free batches, per-example attention, the chunked loss and autocast each depend on the method, the
objective, the number of processes training together and the hardware. The trainer, the arguments it hands
transformers, the Ray workers and the estimator all ask `training_policy`, so an estimate describes the run
that will happen and no caller keeps a copy of a rule that can drift.

Needs no loaded model: what depends on the model (whether its head suits the chunked loss) is an input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.config import TRL_OBJECTIVES, VIRTUAL_TOKEN_METHODS, RunConfig

PACKED_PREFERENCE = ("dpo", "kto", "orpo", "simpo")  # TRL trainers whose model calls tunelab packs

if TYPE_CHECKING:
    import torch

    from tunelab.models import Precision


@dataclass(frozen=True)
class TrainingPolicy:
    device: str
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast over float32 weights; None: float32 throughout
    padding_free: bool  # each batch is one row, examples end to end, position ids restarting per example
    per_example_attention: bool  # tunelab.train.attention: each example attends on its own, no mask is built
    chunked_loss: bool  # training steps take tunelab.losses' chunked loss instead of the model's own
    liger_loss: bool  # Liger's fused linear cross-entropy (train.liger_kernel on CUDA)

    @property
    def full_logits(self) -> bool:
        """Whether a training step holds the full-vocabulary logits (neither the chunked nor Liger's loss)."""
        return not (self.chunked_loss or self.liger_loss)


def training_policy(cfg: RunConfig, precision: Precision, world_size: int = 1,
                    model_supports_chunked_loss: bool = True) -> TrainingPolicy:
    """The training path for `cfg` on `precision`'s device with `world_size` processes training together.
    `model_supports_chunked_loss`: tunelab.losses.supports_chunked_loss of the model, where one is loaded."""
    t = cfg.train
    # TRL's trainers build their own batches and losses; virtual-token methods prepend to every row, so
    # neither the positions nor the decoder's inputs are the batch's own.
    own_batches = cfg.objective.type not in TRL_OBJECTIVES and cfg.method.type not in VIRTUAL_TOKEN_METHODS
    # NEFTune's noise scale depends on the row length, which a padding-free row would change.
    # DPO, KTO, ORPO, SimPO: TRL's trainers pad, tunelab packs their model calls (train/preference_packing.py).
    packed_pairs = cfg.objective.type in PACKED_PREFERENCE and cfg.method.type not in VIRTUAL_TOKEN_METHODS
    padding_free = t.padding_free and (own_batches or packed_pairs) and t.neftune_noise_alpha is None
    # The chunked loss calls the decoder outside the DistributedDataParallel wrapper, whose forward is what
    # arms gradient averaging: with several processes the model's own loss keeps the replicas in step
    # (measured: step-1 grad norm 13.5 instead of 10.3). Liger's kernels bring their own fused loss.
    # Packed preference pairs read their per-token log-probs from the chunked head, with a frozen head only
    # (ORPO/SimPO: train/preference_head.py; DPO/KTO: preference_packing.chunked_head_outputs).
    logits_free_pairs = packed_pairs and padding_free and cfg.method.type != "full"
    chunked_loss = (t.chunked_loss and (own_batches or logits_free_pairs) and world_size == 1
                    and not t.liger_kernel and model_supports_chunked_loss)
    return TrainingPolicy(
        device=precision.device, autocast_dtype=precision.autocast_dtype, padding_free=padding_free,
        per_example_attention=padding_free, chunked_loss=chunked_loss,
        liger_loss=t.liger_kernel and precision.device == "cuda",
    )


def planned_world_size(cfg: RunConfig) -> int:
    """Processes that will train `cfg` together: its Ray workers, or this one process."""
    return cfg.cluster.num_workers if cfg.cluster.backend == "ray" else 1


def process_group_size() -> int:
    """Processes training together with this one: the torch.distributed group (a Ray Train worker's), else
    the WORLD_SIZE a launcher such as torchrun set for the group the Trainer will start, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
