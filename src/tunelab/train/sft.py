"""The train stage for supervised objectives: sft (loss on assistant answers) and cpt (loss on every token).

Built on the transformers Trainer (schedules, accumulation normalized by target tokens, checkpoints,
resume) with our own tokenization, masks, collators and guards; the output is a plain PEFT adapter folder
(or a full model folder for method.type: full).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir, write_text_atomic
from tunelab.chat import encode_records, text_ids
from tunelab.config import RunConfig
from tunelab.data.pack import PackedCollator, pack_examples
from tunelab.data.prepare import Dataset
from tunelab.errors import DataError
from tunelab.losses import mean_token_loss, supports_chunked_loss
from tunelab.measure import peak_memory_mb
from tunelab.progress import console
from tunelab.train.args import training_arguments
from tunelab.train.attention import padding_free_attention
from tunelab.train.fused_layers import fused_training_layers
from tunelab.train.callbacks import MetricsCallback
from tunelab.train.collate import PaddingCollator, PaddingFreeCollator
from tunelab.train.methods import build_trainable, count_parameters, training_inputs
from tunelab.train.policy import TrainingPolicy, process_group_size, training_policy
from tunelab.train.trainer import (
    TrainingError,
    TunelabTrainer,
    UnpackAfterEval,
    WallTimeBudget,
    checkpoint_problem,
    complete_checkpoints,
)


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    first_loss: float
    last_loss: float
    val_loss: float
    train_seconds: float
    tokens_seen: int
    tokens_per_second: float
    peak_memory_mb: float
    trainable_params: int
    total_params: int
    dropped_too_long: int
    precision: str
    stopped_early: bool = False
    chat_template: str = "none (raw text)"  # the template family and where it came from (TemplateSetup.describe)
    model: Any = field(default=None, repr=False, compare=False)  # the trained model, still in memory

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


def encode_split(cfg: RunConfig, tokenizer: Any, records: list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Token ids + labels for a split: assistant-only labels for chat rows, every token for raw text."""
    if cfg.objective.type == "cpt":
        if any(r.kind != "text" for r in records):
            raise DataError("objective.type: cpt trains on raw text rows ({\"text\": ...}); the dataset holds chat rows")
        examples, dropped = [], []
        for r in records:
            ids = text_ids(tokenizer, r.text)
            if len(ids) > cfg.data.max_length:
                dropped.append(r.id)
            else:
                examples.append({"id": r.id, "input_ids": ids, "labels": list(ids)})
        return examples, dropped
    if any(r.kind != "chat" for r in records):
        raise DataError(f"objective.type: sft needs chat rows, but the dataset holds {records[0].kind} rows")
    return encode_records(tokenizer, records, cfg.data.system_prompt, cfg.data.max_length)


def train_sft(cfg: RunConfig, run: RunPaths, dataset: Dataset, resume: bool = False,
              on_metrics: Any = None, training_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune on `dataset.train`; write the adapter (or model), chat template and metrics into `run`.

    Also the body of each distributed worker (tunelab.cluster.ray_runner): the Trainer shards batches across
    the process group, and only the world's rank 0 writes files. `training_overrides` replace single
    TrainingArguments (FSDP settings)."""
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import PrinterCallback

    precision, base_path, tokenizer, template = training_inputs(cfg)

    train_examples, dropped = encode_split(cfg, tokenizer, dataset.train)
    val_examples, _ = encode_split(cfg, tokenizer, dataset.val) if dataset.val else ([], [])
    if dropped:
        console.print(f"[yellow]warning:[/] dropped {len(dropped)} training examples longer than "
                      f"data.max_length={cfg.data.max_length} tokens (first: {dropped[0]})")
    if not train_examples:
        raise DataError(f"data.max_length: every training example is longer than {cfg.data.max_length} tokens")

    set_seed(cfg.train.seed)  # before the adapter exists: its initialization is drawn from this seed
    model = build_trainable(cfg, base_path, precision, tokenizer, template)
    model.config.use_cache = False  # a KV cache is useless in training and would disable packed attention
    policy = training_policy(cfg, precision, process_group_size(), supports_chunked_loss(model))
    trainable, total = count_parameters(model)
    console.print(f"Training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%) with "
                  f"{cfg.method.type} on {len(train_examples)} examples [{precision.label}]")

    rows = pack_examples(train_examples, cfg.data.max_length) if cfg.data.packing else train_examples
    collator = make_collator(cfg, policy, tokenizer.pad_token_id)
    rows = [{**row, "index": i} for i, row in enumerate(rows)]
    example_ids = [row.get("ids") or [row["id"]] for row in rows]
    eval_rows = [{**row, "index": -1} for row in val_examples] if cfg.train.eval_steps else None

    callback = MetricsCallback(run.metrics, collator, on_metrics)
    budget = WallTimeBudget(cfg.train.max_time_minutes) if cfg.train.max_time_minutes else None
    extra = [c for c in (budget, UnpackAfterEval() if cfg.method.type == "qlora" else None) if c is not None]
    if cfg.train.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = TunelabTrainer(
        model=model,
        args=training_arguments(cfg, run, policy, has_eval=eval_rows is not None, **(training_overrides or {})),
        train_dataset=_Rows(rows),
        eval_dataset=_Rows(eval_rows) if eval_rows else None,
        data_collator=collator,
        callbacks=[callback, *extra],
        optimizers=(_loraplus_optimizer(cfg, model), None),
        example_ids=example_ids,
        keep_checkpoints=cfg.train.keep_checkpoints,
        chunked_loss=policy.chunked_loss,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; our bar shows the loss instead

    checkpoint = _resume_point(run) if resume else None
    started = time.perf_counter()
    with (padding_free_attention(model) if policy.per_example_attention else nullcontext(),
          fused_training_layers(cfg, precision.device, model)):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started

    val_loss = mean_token_loss(model, val_examples, tokenizer.pad_token_id, cfg.train.batch_size)
    callback.log_row({"step": output.global_step, "val_loss": val_loss})
    # FSDP holds each parameter in shards: gathering them is a collective every rank joins.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        save_trained(cfg, model, tokenizer, run, state_dict)

    losses = callback.losses or [float("nan")]
    tokens = callback.tokens_before + collator.tokens_seen  # the whole run's, a resumed one's too
    return TrainResult(
        steps=output.global_step, train_loss=run_train_loss(output, callback, checkpoint), first_loss=losses[0],
        last_loss=losses[-1], val_loss=val_loss, train_seconds=round(seconds, 2),
        tokens_seen=tokens, tokens_per_second=round(collator.tokens_seen / seconds, 1),
        peak_memory_mb=round(peak_memory_mb(precision.device), 1), trainable_params=trainable,
        total_params=total, dropped_too_long=len(dropped), precision=precision.label,
        stopped_early=bool(budget and budget.stopped_early), model=model,
        **({"chat_template": template.describe()} if template else {}),
    )


def run_train_loss(output: Any, callback: MetricsCallback, checkpoint: Path | None) -> float:
    """The mean training loss of the whole run. After a resume the Trainer's own figure divides the resumed part's
    loss by every step; the logged losses (every train.logging_steps) cover the whole run instead."""
    if checkpoint is None or not callback.losses:
        return float(output.training_loss)
    return sum(callback.losses) / len(callback.losses)


def make_collator(cfg: RunConfig, policy: TrainingPolicy,
                  pad_token_id: int) -> PaddingFreeCollator | PackedCollator | PaddingCollator:
    if policy.padding_free:
        return PaddingFreeCollator(pad_token_id)
    return PackedCollator(pad_token_id) if cfg.data.packing else PaddingCollator(pad_token_id)


def _resume_point(run: RunPaths) -> Path:
    """The newest checkpoint that can be resumed from; an unusable newer one is named and passed over."""
    found = complete_checkpoints(run.checkpoints)
    if not found:
        raise TrainingError(f"--resume: no complete checkpoint in {run.checkpoints}; train without --resume")
    problems = []
    for checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for skipped in problems:
                console.print(f"[yellow]warning:[/] --resume: {skipped}; passed over")
            console.print(f"Resuming from {checkpoint}")
            return checkpoint
        problems.append(f"{checkpoint} cannot be resumed from: {problem}")
    raise TrainingError(f"--resume: {problems[0]}, nor can any older checkpoint; train without --resume (or with "
                        "--set output.overwrite=true) to start over")


def _loraplus_optimizer(cfg: RunConfig, model: Any) -> Any:
    """LoRA+ sets a higher learning rate for the B matrices; None lets the Trainer build AdamW."""
    if cfg.method.loraplus_lr_ratio is None:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model=model, optimizer_cls=torch.optim.AdamW, lr=cfg.train.learning_rate,
        loraplus_lr_ratio=cfg.method.loraplus_lr_ratio, weight_decay=cfg.train.weight_decay,
    )


def save_trained(cfg: RunConfig, model: Any, tokenizer: Any, run: RunPaths, state_dict: Any = None) -> None:
    """Write the adapter (standard PEFT layout) or the full model, with the exact tokenizer and chat
    template it was trained with. `state_dict`: the gathered weights of a sharded (FSDP) model."""
    from tunelab.hub import name_base_in_adapter

    target = run.trained_for(cfg.method.type)
    with atomic_dir(target) as tmp:
        options: dict[str, Any] = {"state_dict": state_dict} if state_dict is not None else {}
        if cfg.method.type != "full":
            # New tokens' rows are saved as trainable-token deltas; PEFT would otherwise save every row of the
            # resized embedding and head (hundreds of MB for a large vocabulary).
            options["save_embedding_layers"] = False
        model.save_pretrained(tmp, **options)
        name_base_in_adapter(cfg.model, tmp)  # the Hub ID or configured name, not this machine's cache path
        tokenizer.save_pretrained(tmp)
        if tokenizer.chat_template:  # continued pre-training of a base model trains without one
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    if tokenizer.chat_template:
        write_text_atomic(run.chat_template, tokenizer.chat_template)


class _Rows:
    """A list as a map-style dataset (the Trainer needs only __len__ and __getitem__)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]
