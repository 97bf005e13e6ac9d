"""RunConfig -> transformers TrainingArguments, in one place."""

from __future__ import annotations

from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.config import RunConfig
from tunelab.train.policy import TrainingPolicy


def training_arguments(cfg: RunConfig, run: RunPaths, policy: TrainingPolicy, has_eval: bool,
                       **overrides: Any) -> Any:
    """`overrides` replace single arguments (the cluster runner's FSDP settings)."""
    from transformers import TrainingArguments

    return TrainingArguments(**{**training_kwargs(cfg, run, policy, has_eval), **overrides})


def training_kwargs(cfg: RunConfig, run: RunPaths, policy: TrainingPolicy, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by TrainingArguments and every TRL config (they subclass it); precision and
    padding follow `policy` (tunelab.train.policy.training_policy)."""
    import torch

    t = cfg.train
    return dict(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of total steps in transformers 5
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must surface (our trainer stops on it), not be averaged away
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        neftune_noise_alpha=t.neftune_noise_alpha,
        use_liger_kernel=t.liger_kernel,
        report_to="none",
        disable_tqdm=True,  # our own progress bar shows loss
        bf16=policy.autocast_dtype == torch.bfloat16,
        fp16=policy.autocast_dtype == torch.float16,
        use_cpu=policy.device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing measured ~4x faster than reentrant with PEFT.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Padding-free rows carry no attention_mask and no pad: every token counts (and "non_padding" would
        # warn at every step that it cannot tell padding apart).
        include_num_input_tokens_seen="all" if policy.padding_free else "non_padding",
    )
