"""The train stage for objectives trained with TRL: DPO (and its loss variants), SimPO, ORPO, KTO,
reward models, and GRPO.

The reference model for DPO and KTO is the policy as training starts, never a second copy of the model: TRL,
given a PeftModel and no ref_model, adds a frozen copy of its adapter named "ref" and computes the reference
under it. A new adapter starts at zero, so that is the base; one continued from `model.adapter_from` (the
SFT -> DPO recipe) is that SFT model. TRL's own
metrics (reward margins, preference accuracy) flow into metrics.jsonl with the loss.
"""

from __future__ import annotations

import time
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.chat import with_system_prompt
from tunelab.config import ROW_KIND, RunConfig
from tunelab.data.prepare import Dataset
from tunelab.data.tokens import token_counter
from tunelab.errors import ConfigError, DataError
from tunelab.losses import supports_chunked_loss
from tunelab.measure import peak_memory_mb
from tunelab.models import pick_precision
from tunelab.progress import console
from tunelab.train.args import training_kwargs
from tunelab.train.callbacks import MetricsCallback
from tunelab.train.fused_layers import fused_training_layers
from tunelab.train.grpo_rewards import warn_if_rewards_never_differed
from tunelab.train.methods import build_trainable, count_parameters, training_inputs
from tunelab.train.policy import process_group_size, training_policy
from tunelab.train.preference_head import LogitsFreeCPO, LogitsFreeORPO
from tunelab.train.preference_packing import PaddingFreeLogits, PaddingFreePreference
from tunelab.train.sft import TrainResult, _resume_point, run_train_loss, save_trained
from tunelab.train.trainer import (
    StopOnNonFiniteLoss,
    WallTimeBudget,
    with_atomic_checkpoints,
)

def to_trl_rows(cfg: RunConfig, records: list[Any]) -> list[dict[str, Any]]:
    """Records -> TRL's conversational preference / unpaired-preference rows."""
    objective = cfg.objective.type
    rows = []
    for r in records:
        if r.kind != ROW_KIND[objective]:
            raise DataError(f"objective.type: {objective} needs {ROW_KIND[objective]} rows, but row {r.id} is {r.kind}")
        if r.kind == "chat":  # GRPO: the prompt, and the reference answer for rewards that want it
            prompt = with_system_prompt(r.messages[:-1], cfg.data.system_prompt)
            rows.append({"prompt": prompt, "answer": r.messages[-1]["content"]})
            continue
        prompt = with_system_prompt(r.messages, cfg.data.system_prompt)
        if r.kind == "preference":
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r.chosen}],
                         "rejected": [{"role": "assistant", "content": r.rejected}]})
        else:
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": r.completion}],
                         "label": bool(r.label)})
    return rows


def make_trainer(cfg: RunConfig, run: RunPaths, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
                 callbacks: list[Any]) -> Any:
    """The TRL trainer for cfg.objective, configured from the same RunConfig as every other stage."""
    from datasets import Dataset as HFDataset

    policy = training_policy(cfg, pick_precision(cfg.model), process_group_size(), supports_chunked_loss(model))
    common = {**training_kwargs(cfg, run, policy, has_eval=False), "max_length": cfg.data.max_length,
              # TRL's batches have no single input key to count; tokens are counted from the data instead.
              "include_num_input_tokens_seen": "no"}
    objective, o = cfg.objective.type, cfg.objective
    extra: dict[str, Any] = {}
    if objective == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        options = {"beta": o.beta, "loss_type": o.loss_type, "label_smoothing": o.label_smoothing,
                   "precompute_ref_log_probs": o.precompute_ref}
        extra = {"ref_model": None}  # with a PeftModel: the reference is a frozen copy of its starting adapter
    elif objective == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        options = {"beta": o.beta, "precompute_ref_log_probs": o.precompute_ref}
        extra = {"ref_model": None}
    elif objective == "reward":
        from trl import RewardConfig as Config
        from trl import RewardTrainer as Trainer

        options = {}
    elif objective == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        from tunelab.train.grpo_rewards import resolve_rewards

        batch = common["per_device_train_batch_size"] * common["gradient_accumulation_steps"]
        if batch % o.num_generations:
            raise ConfigError(f"train.batch_size x gradient_accumulation_steps ({batch}) must be a multiple of "
                              f"objective.num_generations ({o.num_generations}) for GRPO")
        common.pop("max_length")
        options = {"num_generations": o.num_generations, "max_completion_length": o.max_completion_tokens,
                   "temperature": o.temperature, "beta": o.grpo_kl}
        extra = {"reward_funcs": resolve_rewards(o)}
        # TRL ends a completion at the model's generation-config eos ids and the tokenizer's eos only: a template's
        # end of turn that is neither (a base model given one) would let completions, and their rewards, run on.
        from tunelab.families import stop_token_ids

        model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)
    elif objective == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

        options = {"beta": o.beta}
    else:  # simpo
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        # SimPO is CPO's loss with a length-normalized reward and no NLL term (cpo_alpha=0), per the paper.
        options = {"beta": o.beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": o.simpo_gamma}
    if policy.padding_free:
        mixin: type = PaddingFreePreference
        if objective in ("orpo", "simpo"):  # their forward is replaced (train/preference_head.py)
            mixin = ((LogitsFreeORPO if objective == "orpo" else LogitsFreeCPO) if policy.chunked_loss
                     else PaddingFreeLogits)
        Trainer = type(f"PaddingFree{Trainer.__name__}", (mixin, Trainer), {"own_head": policy.chunked_loss})
    return with_atomic_checkpoints(Trainer)(
        model=model, args=Config(**common, **options), train_dataset=HFDataset.from_list(train_rows),
        processing_class=tokenizer, callbacks=callbacks, **extra,
    )


def train_preference(cfg: RunConfig, run: RunPaths, dataset: Dataset, resume: bool = False,
                     on_metrics: Any = None) -> TrainResult:
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    precision, base_path, tokenizer, template = training_inputs(cfg)
    train_rows = to_trl_rows(cfg, dataset.train)

    set_seed(cfg.train.seed)
    if cfg.objective.type == "reward":
        from tunelab.train.reward_model import build_reward_model

        model = build_reward_model(cfg, base_path, precision, tokenizer, template)
    else:
        model = build_trainable(cfg, base_path, precision, tokenizer, template)
    trainable, total = count_parameters(model)
    console.print(f"Training {trainable:,} of {total:,} parameters with {cfg.method.type} + "
                  f"{cfg.objective.type} on {len(train_rows)} rows [{precision.label}]")
    # Every row is read once per epoch: both answers of a pair (or the one of a KTO row) with the prompt.
    per_epoch = sum(token_counter(tokenizer, cfg.data.system_prompt)(dataset.train))
    per_epoch *= 1 if cfg.objective.type in ("kto", "grpo") else 2
    callback = MetricsCallback(run.metrics, None, on_metrics, tokens_per_epoch=per_epoch)
    budget = WallTimeBudget(cfg.train.max_time_minutes) if cfg.train.max_time_minutes else None
    callbacks = [callback, StopOnNonFiniteLoss(), *([budget] if budget else [])]
    trainer = make_trainer(cfg, run, model, tokenizer, train_rows, callbacks)
    trainer.keep_checkpoints = cfg.train.keep_checkpoints
    trainer.remove_callback(PrinterCallback)

    checkpoint = _resume_point(run) if resume else None
    started = time.perf_counter()
    with fused_training_layers(cfg, precision.device, model):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    save_trained(cfg, model, tokenizer, run)
    if cfg.objective.type == "grpo":
        warn_if_rewards_never_differed(run.metrics)
    tokens = int(per_epoch * float(trainer.state.epoch or 0))
    losses = callback.losses or [float("nan")]
    return TrainResult(
        steps=output.global_step, train_loss=run_train_loss(output, callback, checkpoint), first_loss=losses[0],
        last_loss=losses[-1], val_loss=float("nan"), train_seconds=round(seconds, 2), tokens_seen=tokens,
        tokens_per_second=round(tokens / seconds, 1), peak_memory_mb=round(peak_memory_mb(precision.device), 1),
        trainable_params=trainable, total_params=total, dropped_too_long=0, precision=precision.label,
        stopped_early=bool(budget and budget.stopped_early), model=model,
        **({"chat_template": template.describe()} if template else {}),
    )
