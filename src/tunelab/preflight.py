"""Pre-flight: combinations that cannot work, refused before any weights load, each with what to change.

Device-dependent checks are made against the device that trains (`training_device`), which is not always this
process's: on a KubeRay cluster the driver runs on a head pod without a GPU while the workers hold the GPUs.
"""

from __future__ import annotations

import importlib.util
import json

from tunelab.artifacts import RunPaths
from tunelab.config import VIRTUAL_TOKEN_METHODS, RunConfig
from tunelab.errors import ConfigError
from tunelab.models import ModelSource, pick_device

PACKABLE_OBJECTIVES = ("sft", "cpt")


def training_device(cfg: RunConfig) -> str:
    """The device the training processes run on. With Ray GPU workers that is their CUDA GPU, whatever this
    process sees: the driver trains nothing, and each worker picks its own precision when it loads the model.
    Otherwise it is the device this process picks: Ray CPU workers are taken to see what the driver sees (on
    KubeRay both are pods without a GPU; on one machine, the same devices)."""
    if cfg.cluster.backend == "ray" and cfg.cluster.use_gpu:
        return "cuda"
    return pick_device(cfg.model.device)


def check_compatibility(cfg: RunConfig, device: str, source: ModelSource | None = None) -> None:
    """Raise ConfigError listing every incompatible choice in `cfg` for `device`, the device that trains."""
    problems = []
    method, train, data = cfg.method, cfg.train, cfg.data
    # On Ray CPU workers the other way out is GPU workers.
    or_gpu_workers = ", or cluster.use_gpu: true" if cfg.cluster.backend == "ray" else ""
    if method.type == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("method.type: qlora needs bitsandbytes; install it (pip install bitsandbytes==0.50.2) "
                        "or use method.type: lora")
    if data.packing and cfg.objective.type not in PACKABLE_OBJECTIVES:
        problems.append(f"data.packing: objective {cfg.objective.type} compares whole sequences and cannot pack; "
                        "set data.packing: false")
    if data.packing and method.type in VIRTUAL_TOKEN_METHODS:
        problems.append(f"data.packing: {method.type} prepends virtual tokens to each row, which breaks packed "
                        "position ids; set data.packing: false")
    if method.type == "prefix_tuning" and train.gradient_checkpointing:
        problems.append("train.gradient_checkpointing: prefix tuning feeds past key/values that checkpointing "
                        "cannot recompute; set it to false")
    if method.type == "prefix_tuning" and source is not None and source.kind in ("folder", "hub"):
        config = json.loads((source.path / "config.json").read_text())
        if not all(k in config for k in ("num_attention_heads", "num_hidden_layers", "hidden_size")):
            problems.append(f"method.type: prefix tuning needs a decoder with attention heads, and "
                            f"{source.path} ({config.get('model_type')}) has none; use lora")
    if train.liger_kernel and device != "cuda":
        problems.append(f"train.liger_kernel: Liger kernels run on CUDA GPUs only (this run is on {device}); "
                        f"set it to false{or_gpu_workers}")
    if cfg.model.dtype == "float16" and device == "cpu":
        problems.append(f"model.dtype: float16 is not supported on CPU; use bfloat16, float32 or auto{or_gpu_workers}")
    if train.early_stopping_patience and not data.val_fraction:
        problems.append("train.early_stopping_patience: needs a val split; set data.val_fraction above 0")
    start = cfg.model.adapter_from
    if start is not None and not RunPaths(start).has_adapter:
        problems.append(f"model.adapter_from: {start} holds no trained adapter (run its training first)")
    if start is not None and method.type not in ("lora", "qlora"):
        problems.append(f"model.adapter_from: continuing an adapter needs method.type lora or qlora, not {method.type}")
    if problems:
        raise ConfigError(*problems)
