"""One training policy: the estimator plans the run the trainer will run, for every method, objective and
world size; the arguments handed to transformers follow it too."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch

from tunelab.config import MethodConfig, ObjectiveConfig
from tunelab.config_file import validate_config
from tunelab.estimate import DataStats, planned_policy, workload
from tunelab.losses import supports_chunked_loss
from tunelab.models import Precision
from tunelab.train.policy import training_policy

METHODS = get_args(MethodConfig.model_fields["type"].annotation)
OBJECTIVES = get_args(ObjectiveConfig.model_fields["type"].annotation)
CPU = Precision("cpu", None, torch.float32)
STATS = DataStats(examples=8, tokens=400, padded_tokens=480, steps_per_epoch=1, peak_tokens=480, attention_span=60,
                  attention_probs=0,
                  peak_targets=40, max_length=60)


def run_config(model_dir: Path, method: str, objective: str = "sft", world_size: int = 1, train: dict | None = None):
    cluster = {"backend": "ray", "num_workers": world_size} if world_size > 1 else {}
    return validate_config({
        "model": {"name": str(model_dir), "dtype": "float32"}, "data": {"train": "train.jsonl"},
        "method": {"type": method, "num_virtual_tokens": 4}, "objective": {"type": objective},
        "train": {"gradient_checkpointing": False, **(train or {})}, "cluster": cluster,
    })


@pytest.fixture(scope="module")
def supports_by_method(tiny_model_dir) -> dict[str, bool]:
    """What the trainer asks of the model it built: does its head suit the chunked loss (per method)."""
    from tunelab.train.methods import build_trainable, training_inputs

    found = {}
    for method in METHODS:
        cfg = run_config(tiny_model_dir, method)
        precision, base_path, tokenizer, template = training_inputs(cfg)
        found[method] = supports_chunked_loss(build_trainable(cfg, base_path, precision, tokenizer, template))
    return found


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("method", METHODS)
def test_the_estimator_plans_what_the_trainer_does(method, objective, world_size, tiny_model_dir, supports_by_method):
    cfg = run_config(tiny_model_dir, method, objective, world_size)
    # The trainer: its own process count (a Ray worker's group) and the model it built.
    trainer = training_policy(cfg, CPU, world_size, supports_by_method[method])
    estimator = planned_policy(cfg, CPU)
    assert estimator == trainer

    own_batches = objective in ("sft", "cpt") and method not in ("prompt_tuning", "prefix_tuning")
    packed_pairs = objective in ("dpo", "kto", "orpo", "simpo") and method not in ("prompt_tuning", "prefix_tuning")
    assert trainer.padding_free == trainer.per_example_attention == (own_batches or packed_pairs)
    # Packed pairs read per-token log-probs from the chunked head; it must stay frozen.
    logits_free_pairs = packed_pairs and method != "full"
    assert trainer.chunked_loss == ((own_batches or logits_free_pairs) and world_size == 1)
    # The estimate's largest step holds the full-vocabulary logits exactly when the trainer's does.
    assert workload(cfg, estimator, STATS, 49152).chunked_loss == (not trainer.full_logits) == trainer.chunked_loss


def test_neftune_and_liger_turn_padding_free_and_the_chunked_loss_off(tiny_model_dir):
    neftune = run_config(tiny_model_dir, "lora", train={"neftune_noise_alpha": 5.0})
    assert planned_policy(neftune, CPU) == training_policy(neftune, CPU)
    assert not training_policy(neftune, CPU).padding_free and training_policy(neftune, CPU).chunked_loss

    liger = run_config(tiny_model_dir, "lora", train={"liger_kernel": True})
    gpu = Precision("cuda", torch.bfloat16, torch.float32)
    on_gpu = training_policy(liger, gpu, world_size=2)
    assert not on_gpu.chunked_loss and on_gpu.liger_loss and not on_gpu.full_logits  # Liger's fused loss
    assert planned_policy(liger, gpu) == on_gpu and on_gpu.autocast_dtype == torch.bfloat16


def test_the_estimate_of_a_ddp_run_holds_the_full_logits(tiny_config, tmp_path):
    """Each DDP worker trains with the model's own loss: its logits (bf16), their fp32 log-softmax and two
    fp32 gradients over the whole vocabulary, for every token of the largest batch."""
    from tunelab.estimate import estimate_run

    prices = tmp_path / "prices.yaml"
    prices.write_text("Big: {memory_gib: 80, bf16_tflops: 1000, usd_per_hour: 2.5}\n", encoding="utf-8")
    tiny_config.model.dtype = "auto"  # bf16 autocast on the GPU
    alone = estimate_run(tiny_config, gpu="Big", probe=False, prices_file=prices)
    tiny_config.cluster.backend, tiny_config.cluster.num_workers = "ray", 2
    ddp = estimate_run(tiny_config, gpu="Big", probe=False, prices_file=prices)

    full_logits = (2 + 3 * 4) * ddp.data.peak_tokens * ddp.shape.vocab
    assert ddp.memory.loss == full_logits
    assert alone.memory.loss < full_logits / 2  # one process: the chunked loss
    assert ddp.memory.weight_copies - alone.memory.weight_copies == 2 * ddp.shape.head_params  # the head's bf16 copy


@pytest.mark.parametrize("train", [{"neftune_noise_alpha": 5.0}, {}], ids=["neftune", "lora"])
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_trainer_counts_padding_unless_the_batches_are_padding_free(method, train, tiny_model_dir):
    """train.padding_free is on in every config here; the batches are padding-free only where the policy says
    so, and transformers must count tokens the same way (padding-free rows carry no attention mask)."""
    from transformers import TrainingArguments

    from tunelab.artifacts import RunPaths
    from tunelab.train.args import training_arguments

    cfg = run_config(tiny_model_dir, method, train=train)
    assert cfg.train.padding_free
    policy = training_policy(cfg, CPU)
    args = training_arguments(cfg, RunPaths(Path("run")), policy, has_eval=False)
    assert isinstance(args, TrainingArguments)
    padding_free = method == "lora" and not train
    assert policy.padding_free == padding_free
    assert args.include_num_input_tokens_seen == ("all" if padding_free else "non_padding")
