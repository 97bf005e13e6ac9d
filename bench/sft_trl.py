"""The SFT benchmark's trl side (bench/train_throughput.py): TRL's SFTTrainer set up for speed as its documentation
recommends, on exactly the tokens and loss mask tunelab trains on.

What TRL 1.16's source says, and so how it is set up here:
- `padding_free=True`: its collator puts a batch end to end in one row with restarting position ids (as
  tunelab's padding-free collator does). Without packing it refuses a `max_length` (it would not be enforced):
  `max_length=None`; no example of the benchmark's data is longer than 600 tokens.
- The loss mask: a pre-tokenized dataset (an `input_ids` column) with a `completion_mask` column gets its labels
  from that mask only when `completion_only_loss=True`; left at its default (None) the option turns itself on
  for prompt/completion datasets only, and the mask would be silently dropped (loss on every token). So it is
  set, and `check_same_batches` fails the side if TRL's collated labels are not tunelab's.
  (`assistant_only_loss=True` is no alternative: it needs `{% generation %}` blocks SmolLM2's template lacks.)
- Gradient checkpointing defaults to on in every TRL config: turned off, as tunelab's default is.
- bf16 defaults to on; on CPU TRL refuses it without `use_cpu=True`. Set by tunelab's rule (bf16 autocast where
  the hardware runs it fast, float32 master weights), and checked: a projection's output dtype while training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable


def run_trl(data: Path, work: Path, hyper: dict[str, Any], lora: dict[str, Any],
            eval_loss: Callable[[Any, Any, Path], float]) -> dict[str, Any]:
    import torch
    from datasets import Dataset as HFDataset
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from tunelab.chat import IGNORE_INDEX, encode_records
    from tunelab.config import ModelConfig
    from tunelab.data.load import load_records
    from tunelab.measure import peak_memory_mb
    from tunelab.models import load_model, load_tokenizer, pick_precision, resolve_model

    base = resolve_model(ModelConfig())
    tokenizer = load_tokenizer(base)
    # No cut: bench/train_scaling.py trains 4k-token examples; tunelab's side gets data.max_length to match.
    examples, _ = encode_records(tokenizer, load_records(data / "train.jsonl"), None, 1 << 16)
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(t != IGNORE_INDEX) for t in e["labels"]]}
            for e in examples]
    precision = pick_precision(ModelConfig())
    bf16 = precision.autocast_dtype == torch.bfloat16
    set_seed(hyper["seed"])
    model = load_model(base, precision)
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=hyper["batch_size"],
        learning_rate=hyper["learning_rate"], lr_scheduler_type=hyper["lr_scheduler"],
        warmup_steps=hyper["warmup_ratio"], num_train_epochs=hyper["epochs"], seed=hyper["seed"],
        data_seed=hyper["seed"], logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        padding_free=True, max_length=None, completion_only_loss=True, activation_checkpointing=False,
        bf16=bf16, use_cpu=precision.device == "cpu",
    )
    if args.activation_checkpointing or args.gradient_checkpointing:
        raise SystemExit("trl: gradient checkpointing is still on")
    trainer = SFTTrainer(model=model, args=args, train_dataset=HFDataset.from_list(rows), processing_class=tokenizer)
    check_same_batches(trainer, examples, hyper["batch_size"])
    seen = watch_compute_dtype(model)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    expected = torch.bfloat16 if bf16 else torch.float32
    if seen != [expected] or _checkpointing(model):
        raise SystemExit(f"trl: trained with projections in {seen} (expected {expected}), "
                         f"checkpointing {_checkpointing(model)}")
    return {"seconds": seconds, "peak_memory_train_mb": round(peak_memory_mb(precision.device), 1),
            "tokens": sum(len(e["input_ids"]) for e in examples), "steps": output.global_step,
            "train_loss": float(output.training_loss), "eval_loss": eval_loss(model, tokenizer, data),
            "precision": f"{precision.device}, bf16={args.bf16}, padding_free={args.padding_free}, "
                         f"checkpointing={args.activation_checkpointing}",
            "compute_dtype": "bfloat16" if bf16 else "float32"}


def check_same_batches(trainer: Any, examples: list[dict[str, Any]], batch_size: int) -> None:
    """Exit unless TRL's collator, on the dataset as TRL prepared it, gives every batch (taken in order) exactly
    the input ids, labels and position ids that tunelab's padding-free collator gives for the same examples.
    The training loop's sampler only changes which examples share a batch, not what each one holds."""
    import torch

    from tunelab.train.collate import PaddingFreeCollator

    prepared = trainer.train_dataset
    if len(prepared) != len(examples):
        raise SystemExit(f"trl: prepared {len(prepared)} examples of {len(examples)}")
    ours = PaddingFreeCollator(pad_token_id=0)
    for start in range(0, len(examples), batch_size):
        theirs = trainer.data_collator([prepared[i] for i in range(start, min(start + batch_size, len(examples)))])
        mine = ours(examples[start : start + batch_size])
        for key in ("input_ids", "labels", "position_ids"):
            if not torch.equal(theirs[key], mine[key]):
                raise SystemExit(f"trl: {key} of batch {start // batch_size} differ from tunelab's")


def watch_compute_dtype(model: Any) -> list[Any]:
    """The dtype(s) the first layer's MLP down projection outputs while training, filled in as it runs."""
    seen: list[Any] = []
    layer = model.get_base_model().model.layers[0].mlp.down_proj

    def record(_module: Any, _inputs: Any, output: Any) -> None:
        if _module.training and output.dtype not in seen:
            seen.append(output.dtype)

    layer.register_forward_hook(record)
    return seen


def _checkpointing(model: Any) -> bool:
    base = model.get_base_model()
    return bool(getattr(base, "is_activation_checkpointing", False))
