"""Trainer callbacks: the loss curve to metrics.jsonl and a live progress bar with the loss."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunelab.artifacts import write_text_atomic
from tunelab.data.pack import PackedCollator
from tunelab.progress import progress_bar
from tunelab.train.collate import PaddingCollator


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per log event (step, loss, lr, grad norm, tokens/s) and per val-loss evaluation, and
    drives the bar."""

    def __init__(self, path: Path, collator: PaddingCollator | PackedCollator | None,
                 sink: Callable[[dict[str, Any]], None] | None = None, tokens_per_epoch: int | None = None) -> None:
        self.path = path
        self.collator = collator
        self.tokens_per_epoch = tokens_per_epoch  # where no collator of ours counts: the data's tokens x epochs
        self.sink = sink  # e.g. the MLflow tracker
        self.losses: list[float] = []  # every logged loss of the run, the interrupted part's too after a resume
        self.tokens_before = 0  # tokens the run had seen when this process resumed it
        self._bar: Any = None
        self._task: Any = None
        self._started = 0.0
        self.writer = True  # false on every distributed rank but 0: one curve, one bar, one MLflow writer

    def log_row(self, row: dict[str, Any]) -> None:
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.sink is not None:
            self.sink(row)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.writer = state.is_world_process_zero
        if not self.writer:
            return
        if state.global_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh curve
        elif self.path.exists():
            _drop_rows_after(self.path, state.global_step)
            self._continue_from(self.path)
        self._started = time.perf_counter()
        self._bar = progress_bar()
        self._bar.start()
        self._task = self._bar.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def _continue_from(self, path: Path) -> None:
        """A resumed run's numbers cover the whole run: the losses and tokens of the part before the checkpoint."""
        rows = [r for r in _rows(path) if isinstance(r, dict) and "loss" in r]
        self.losses = [float(r["loss"]) for r in rows]
        if self.collator is not None:
            self.tokens_before = max((r.get("tokens_seen") or 0 for r in rows), default=0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        elapsed = time.perf_counter() - self._started
        loss = float(logs["loss"])
        self.losses.append(loss)
        # Our collators count real tokens; TRL's trainers report theirs in the state, or (preference objectives,
        # whose batches have no one input to count) the data's tokens times the epochs done stand in.
        tokens = (self.collator.tokens_seen + self.tokens_before if self.collator is not None
                  else (state.num_input_tokens_seen or None))
        if tokens is None and self.tokens_per_epoch:
            tokens = int(self.tokens_per_epoch * float(state.epoch or 0.0)) or None
        row = {
            "step": state.global_step,
            "epoch": round(float(state.epoch or 0.0), 4),
            "loss": loss,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": _finite_or_none(logs.get("grad_norm")),
            "tokens_seen": tokens,
            "tokens_per_second": round((tokens - self.tokens_before) / elapsed, 1) if tokens and elapsed > 0 else None,
            "elapsed_s": round(elapsed, 2),
        }
        # Objective-specific numbers (DPO reward margins and accuracy, KTO's KL, ...) go in as logged.
        row.update({k: float(v) for k, v in logs.items() if k not in row and isinstance(v, (int, float))
                    and k not in ("epoch", "num_input_tokens_seen", "train_tokens_per_second")})
        self.log_row(row)
        if self._bar is not None:
            self._bar.update(self._task, info=f"loss {loss:.4f}  {row['tokens_per_second'] or 0:.0f} tok/s")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        """The val loss of each train.eval_steps evaluation, as its own row (the loss curve's val points; what a
        sweep's early stopping compares trials on)."""
        loss = (metrics or {}).get("eval_loss")
        if loss is not None:
            self.log_row({"step": state.global_step, "eval_loss": float(loss)})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def _drop_rows_after(path: Path, step: int) -> None:
    """A resumed run continues the curve from its checkpoint: rows the interrupted run logged after that step are
    redone, so they go (else the curve holds two rows for each of those steps)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(kept))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf  # a line cut short by the kill: it goes too


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
