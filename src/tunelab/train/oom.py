"""CUDA out of memory while training, turned into one line of advice for the config that ran out."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from tunelab.artifacts import RunPaths
from tunelab.config import RunConfig
from tunelab.errors import TrainingError

OOM_RUNBOOK = "docs/runbooks/fine-tune-oom.md"


@contextlib.contextmanager
def advice_on_out_of_memory(cfg: RunConfig, run: RunPaths) -> Iterator[None]:
    """A GPU running out of memory while training becomes the runbook's advice for this config (in the process
    that trains: this one, or each Ray worker, whose TunelabError reaches the driver as it was raised)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise TrainingError(out_of_memory_advice(cfg, run, str(err))) from err


def out_of_memory_advice(cfg: RunConfig, run: RunPaths, message: str) -> str:
    """One line: what ran out, then the changes that lower peak memory, leaving out those this config has made."""
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", message)
    fixes = []
    if cfg.train.batch_size > 1:
        fixes.append(f"lower train.batch_size (now {cfg.train.batch_size}) and raise train.gradient_accumulation_steps "
                     f"(now {cfg.train.gradient_accumulation_steps}) to keep the effective batch")
    else:
        fixes.append(f"lower data.max_length (now {cfg.data.max_length})")
    if not cfg.train.gradient_checkpointing:
        fixes.append("set train.gradient_checkpointing=true")
    if cfg.method.type == "full":
        fixes.append("train an adapter (method.type=lora or qlora) instead of every weight")
    elif cfg.method.type != "qlora":
        fixes.append("train with method.type=qlora")
    options = f"{', '.join(fixes[:-1])} or {fixes[-1]}" if len(fixes) > 1 else fixes[0]
    size = f" (it asked for {asked.group(1)} more)" if asked else ""
    return (f"training ran out of GPU memory{size}: {options}; `tunelab estimate {run.config} --no-probe` shows "
            f"where the memory goes (runbook: {OOM_RUNBOOK})")
