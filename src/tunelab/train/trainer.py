"""The transformers Trainer with the three guarantees peers lack, added by small overrides:

- checkpoints are written to a staging folder and renamed into place, so a kill mid-save never leaves a
  half-written checkpoint for `--resume` to trip on; only the last `keep` complete ones are kept;
- a NaN or inf loss stops the run at once, naming the step and the examples in the batch (the stock
  Trainer silently replaces it with the running average);
- batches carry the index of each example, for that message, and it is removed before the model sees it.

With `chunked_loss` (which tunelab.train.policy grants single-process runs only), training batches take the
loss of tunelab.losses (targets only, in chunks, no full-vocabulary logits); evaluation keeps the model's own.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from tunelab.artifacts import CHECKPOINT, safetensors_problem
from tunelab.errors import TrainingError

STAGING = ".staging"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a file missing or cut short), or None. Staged writes make this rare;
    a copy, a full disk or a hand edit still happen, and resuming without the optimizer's or the schedule's state
    would continue a different training without a word."""
    import json
    import zipfile

    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        for path in [checkpoint / "optimizer.pt", checkpoint / "scheduler.pt", *checkpoint.glob("rng_state*.pth")]:
            zipfile.ZipFile(path).close()  # torch.save's zip: cut short, it has no central directory
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return f"a file is unreadable or cut short ({type(err).__name__}: {str(err)[:80]})"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "it holds no weights (*.safetensors)"
    for path in weights:
        if (problem := safetensors_problem(path)) is not None:
            return f"{path.name}: {problem}"
    return None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Staging folders (a save that was cut short) never count."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


class AtomicCheckpoints:
    """Mixin for any transformers Trainer (ours or TRL's): checkpoints are staged, then renamed into place."""

    keep_checkpoints = 2
    _staging = False

    def _get_output_dir(self, trial: Any) -> str:
        real = super()._get_output_dir(trial)
        return os.path.join(real, STAGING) if self._staging else real

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = Path(super()._get_output_dir(trial))
        if self.args.should_save:
            shutil.rmtree(root / STAGING, ignore_errors=True)  # leftovers of a save that was killed
        # Distributed runs: every rank writes into staging (its RNG state, FSDP shards), so no rank may
        # start before staging is cleared, and rank 0 renames only once all have finished. No-ops alone.
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            with _new_token_rows_only(self.accelerator.unwrap_model(self.model)):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        name = f"checkpoint-{self.state.global_step}"
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / STAGING / name, final)
        shutil.rmtree(root / STAGING, ignore_errors=True)
        for old in complete_checkpoints(root)[: -self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _new_token_rows_only(model: Any) -> Iterator[None]:
    """While a checkpoint is written, an adapter saves the rows of the tokens a chat template added as
    trainable-token deltas only (as the final adapter does, sft.save_trained): PEFT would otherwise put the whole
    resized embedding and head into every checkpoint (GBs each for a 128k vocabulary). Resuming restores the rows
    from those deltas."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
    try:
        yield
    finally:
        del model.save_pretrained


def with_atomic_checkpoints(trainer_class: type) -> type:
    """The same trainer class with staged, atomically renamed checkpoints (used for TRL's trainers)."""
    return type(f"Atomic{trainer_class.__name__}", (AtomicCheckpoints, trainer_class), {})


class TunelabTrainer(AtomicCheckpoints, Trainer):
    def __init__(self, *args: Any, example_ids: list[list[str]], keep_checkpoints: int, chunked_loss: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.example_ids = example_ids
        self.keep_checkpoints = keep_checkpoints
        self.chunked_loss = chunked_loss
        self.loss_parts: dict[str, float] = {}  # task and replay loss sums since the last log (data.replay)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        indices = inputs.pop("example_index", None)
        replay_mask = inputs.pop("replay_mask", None)
        if self.chunked_loss and model.training and not return_outputs:
            result = self._chunked_loss(model, inputs, num_items_in_batch, replay_mask)
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss = result[0] if isinstance(result, tuple) else result
        if model.training and not torch.isfinite(loss.detach()).all():
            names = [] if indices is None else [i for k in indices.tolist() for i in self.example_ids[k]]
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise TrainingError(
                f"training stopped: the loss is {loss.item()} at step {self.state.global_step + 1} "
                f"(examples: {shown}); lower train.learning_rate, use float32 (model.dtype), or check those rows"
            )
        return result

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the task's and the rehearsal rows' mean token loss since the last log (training with replay)."""
        parts, self.loss_parts = self.loss_parts, {}
        if "loss" in logs and parts.get("replay_targets"):
            for name in ("task", "replay"):
                if parts.get(f"{name}_targets"):
                    logs[f"{name}_loss"] = round(parts[f"{name}_loss_sum"] / parts[f"{name}_targets"], 4)
        super().log(logs, *args, **kwargs)

    def _chunked_loss(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any,
                      replay_mask: torch.Tensor | None = None) -> torch.Tensor:
        from tunelab.losses import chunked_causal_lm_loss

        # The Trainer counts num_items_in_batch (and treats the loss as already scaled for gradient
        # accumulation) exactly when the model accepts loss kwargs; follow the same rule.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        # The decoder is called directly, not through the model's forward that the accelerator wrapped in
        # autocast: enter that autocast here, or bf16 training would silently run in float32.
        with self.accelerator.autocast():
            loss = chunked_causal_lm_loss(self.accelerator.unwrap_model(model), inputs, items, replay_mask,
                                          self.loss_parts)
        if self.args.average_tokens_across_devices and items is not None:
            loss = loss * self.accelerator.num_processes
        return loss


class StopOnNonFiniteLoss(TrainerCallback):
    """For trainers whose batches we do not build (TRL's): stop at the first NaN/inf logged loss."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(f"training stopped: the loss is {loss} at step {state.global_step}; lower "
                                "train.learning_rate or objective.beta, or use float32 (model.dtype)")


class WallTimeBudget(TrainerCallback):
    """Stop (with a checkpoint, so `--resume` can continue) once `minutes` of training have passed."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.started = 0.0
        self.stopped_early = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if time.monotonic() - self.started >= self.seconds:
            self.stopped_early = True
            control.should_training_stop = True
            control.should_save = True


class UnpackAfterEval(TrainerCallback):
    """QLoRA on CPU: an eval-mode forward makes bitsandbytes repack 4-bit weights into a layout whose
    forward has no autograd, so later training steps would silently get no input gradients. Calling
    state_dict() restores the trainable layout."""

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            model.state_dict()
