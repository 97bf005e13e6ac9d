"""Pre-flight refuses impossible combinations before any weights load, saying what to change."""

from __future__ import annotations

import importlib.util

import pytest

from tunelab import pipeline
from tunelab.errors import ConfigError
from tunelab.models import locate_model
from tunelab.preflight import check_compatibility, training_device


def problems(cfg, device="cpu") -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_compatibility(cfg, device, locate_model(cfg.model))
    return info.value.problems


def test_packing_needs_a_packable_objective_and_method(tiny_config):
    tiny_config.data.packing = True
    tiny_config.method.type = "prompt_tuning"
    assert problems(tiny_config) == [
        "data.packing: prompt_tuning prepends virtual tokens to each row, which breaks packed position ids; "
        "set data.packing: false"
    ]


def test_gpu_only_options_on_cpu(tiny_config):
    tiny_config.train.liger_kernel = True
    assert problems(tiny_config) == [
        "train.liger_kernel: Liger kernels run on CUDA GPUs only (this run is on cpu); set it to false"
    ]
    check_compatibility(tiny_config, "cuda")  # fine where there is a GPU


def test_prefix_tuning_conflicts(tiny_config):
    tiny_config.method.type = "prefix_tuning"
    tiny_config.train.gradient_checkpointing = True
    assert problems(tiny_config)[0].startswith("train.gradient_checkpointing: prefix tuning feeds past key/values")


def test_qlora_without_bitsandbytes(tiny_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    tiny_config.method.type = "qlora"
    assert problems(tiny_config) == ["method.type: qlora needs bitsandbytes; install it (pip install "
                                     "bitsandbytes==0.50.2) or use method.type: lora"]


def test_every_problem_is_listed_and_dry_run_refuses(tiny_config):
    tiny_config.data.packing = True
    tiny_config.method.type = "prefix_tuning"
    tiny_config.train.liger_kernel = True
    assert len(problems(tiny_config)) == 2
    with pytest.raises(ConfigError):
        pipeline.preflight(tiny_config)


def test_device_checks_are_made_against_the_device_that_trains(tiny_config):
    tiny_config.model.dtype, tiny_config.model.device = "float16", "cpu"
    tiny_config.train.liger_kernel = True
    assert training_device(tiny_config) == "cpu"
    assert problems(tiny_config, training_device(tiny_config)) == [
        "train.liger_kernel: Liger kernels run on CUDA GPUs only (this run is on cpu); set it to false",
        "model.dtype: float16 is not supported on CPU; use bfloat16, float32 or auto",
    ]
    # Ray GPU workers train on their own GPUs, whatever the driver (a KubeRay head pod) sees.
    tiny_config.model.device = "auto"
    tiny_config.cluster.backend, tiny_config.cluster.use_gpu = "ray", True
    tiny_config.cluster.ray_address = "auto"  # the job's own cluster, as `tunelab k8s rayjob` writes it
    assert training_device(tiny_config) == "cuda"
    pipeline.check_before_training(tiny_config)
    tiny_config.cluster.ray_address = None  # a local cluster on this GPU-less machine could never place them
    with pytest.raises(ConfigError, match="2 workers x 1 GPU need 2 GPUs, and the local Ray cluster"):
        pipeline.check_before_training(tiny_config)
    tiny_config.cluster.ray_address = "auto"
    tiny_config.cluster.use_gpu, tiny_config.model.device = False, "cpu"
    assert problems(tiny_config, training_device(tiny_config))[1] == (
        "model.dtype: float16 is not supported on CPU; use bfloat16, float32 or auto, or cluster.use_gpu: true")
