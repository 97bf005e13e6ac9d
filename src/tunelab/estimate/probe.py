"""Measurements the estimate needs: the idle framework's resident memory, and a few real training steps."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig


def baseline_rss_bytes(tracking: bool, quantized: bool, model_folder: Path) -> int:
    """Resident memory of a fresh Python process that imported what a training process imports (torch,
    transformers and its Trainer, PEFT; MLflow when tracking; bitsandbytes for QLoRA) and loaded the model's
    tokenizer, measured in a child process so this one's imports do not count."""
    modules = ["torch", "transformers", "peft", "accelerate", "transformers.trainer"]
    modules += ["mlflow"] if tracking else []
    modules += ["bitsandbytes"] if quantized else []
    code = ("import importlib, logging, warnings; warnings.simplefilter('ignore'); logging.disable(logging.WARNING)\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"importlib.import_module('transformers').AutoTokenizer.from_pretrained({str(model_folder)!r})\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not result.stdout.strip().splitlines():
        raise RuntimeError(f"could not measure the framework's baseline memory: {result.stderr.strip()[-500:]}")
    return int(result.stdout.strip().splitlines()[-1]) * 1024  # VmRSS is in kB


@dataclass(frozen=True)
class ProbeResult:
    steps: int  # timed steps (the first, warm-up step is not counted)
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def probe_training(cfg: RunConfig, train_records: list[Any], steps: int) -> ProbeResult:
    """Run `steps` + 1 real optimizer steps of this config's own training stage (same model, method,
    precision, collator and loss) on a sample of the training set in a throw-away folder; time all but the
    first step from the loss-curve rows."""
    import random

    from tunelab.artifacts import RunPaths
    from tunelab.config import TRL_OBJECTIVES
    from tunelab.data.prepare import Dataset
    from tunelab.train.preference import train_preference
    from tunelab.train.sft import train_sft

    examples_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    wanted = examples_per_step * (steps + 1)
    sample = random.Random(cfg.train.seed).sample(train_records, min(len(train_records), wanted))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-probe-") as tmp:
        probe_cfg = cfg.model_copy(deep=True)
        probe_cfg.train.max_steps = steps + 1
        probe_cfg.train.save_steps = None
        probe_cfg.train.eval_steps = None
        probe_cfg.train.early_stopping_patience = None
        probe_cfg.train.logging_steps = 1
        probe_cfg.train.max_time_minutes = None
        probe_cfg.output.dir = Path(tmp) / "run"
        # Preference objectives count their tokens as the data's tokens times the epochs done (both answers of a
        # pair): the same unit the estimate's run tokens are in. GRPO's time is mostly generation, measured too.
        trainer = train_preference if cfg.objective.type in TRL_OBJECTIVES else train_sft
        trainer(probe_cfg, RunPaths(probe_cfg.output.dir), Dataset(train=sample, val=[], test=[]),
                on_metrics=rows.append)
    timed = [r for r in rows if r.get("tokens_seen") and r.get("elapsed_s") is not None]
    if len(timed) < 2:
        raise RuntimeError(f"the probe logged {len(timed)} timed steps; need 2 or more")
    first, last = timed[0], timed[-1]
    # The data loader fetches one batch ahead, so the token count logged at a step runs one batch early;
    # at the last step every batch has been counted: tokens per step is the final count over all steps.
    per_step = last["tokens_seen"] / last["step"]
    steps_timed = last["step"] - first["step"]
    return ProbeResult(steps=steps_timed, tokens=round(per_step * steps_timed),
                       seconds=float(last["elapsed_s"] - first["elapsed_s"]))
