"""`tunelab estimate`: peak memory, time per epoch and cost of a run config, before running it.

Memory comes from a formula over the model's shapes (memory.py) with parameters counted exactly on a
meta-device copy (shape.py) and the framework's idle memory measured (probe.py); the batch it is evaluated
at is the largest the training set can produce. Time comes from a few real training steps on this machine
(optional) scaled to the training set's tokens, or, for a GPU that is not here, from its bf16 throughput
at an assumed utilization. Cost is time x the GPU's hourly price (prices.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import TRL_OBJECTIVES, VIRTUAL_TOKEN_METHODS, RunConfig
from tunelab.estimate.memory import FP32, MemoryBreakdown, ModelShape, Workload, breakdown
from tunelab.estimate.prices import CPU_USD_PER_HOUR, PRICES_DATE, PRICES_SOURCE, Accelerator, find_gpu, load_table
from tunelab.estimate.probe import ProbeResult, baseline_rss_bytes, probe_training
from tunelab.train.attention import attends_textbook, saved_probabilities
from tunelab.train.policy import TrainingPolicy, planned_world_size, training_policy

if TYPE_CHECKING:
    from tunelab.models import Precision

# A GPU that is not here is timed from its peak bf16 throughput at this share of it (model FLOPs
# utilization); small models on large GPUs reach less (kernel launches dominate), hence the floor below.
ASSUMED_MFU = 0.30
MIN_SECONDS_PER_LAYER_STEP = 1e-3  # forward + backward launch latency floor per decoder layer
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + allocator slack: outside torch.cuda.max_memory_allocated
PAIRED_OBJECTIVES = ("dpo", "simpo", "orpo", "reward")


@dataclass(frozen=True)
class DataStats:
    examples: int
    tokens: int  # real tokens in one epoch
    padded_tokens: int  # tokens the model processes in one epoch (padding included)
    steps_per_epoch: int
    peak_tokens: int  # tokens in the largest forward pass
    attention_span: int
    attention_probs: int  # softmax probabilities per head a layer keeps in the largest step (CPU attention)
    peak_targets: int
    max_length: int
    grouped_kv_tokens: int = 0  # tokens of the largest step whose keys/values stay per key/value head (CPU attention)


@dataclass
class Estimate:
    device: str
    precision: str
    shape: ModelShape
    data: DataStats
    memory: MemoryBreakdown
    memory_limit_gib: float | None
    steps: int
    seconds: float | None
    time_source: str
    usd_per_hour: float
    price_source: str
    probe: ProbeResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cost_usd(self) -> float | None:
        return None if self.seconds is None else self.seconds / 3600 * self.usd_per_hour

    @property
    def fits(self) -> bool | None:
        return None if self.memory_limit_gib is None else self.memory.peak <= self.memory_limit_gib * 2**30

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device, "precision": self.precision,
            "params": {"base": self.shape.base_params, "trainable": self.shape.trainable_params,
                       "adapter": self.shape.adapter_params, "quantizable_linear": self.shape.linear_params},
            "data": self.data.__dict__,
            "memory_bytes": self.memory.to_json(),
            "peak_memory_mib": round(self.memory.peak / 2**20, 1),
            "memory_limit_gib": self.memory_limit_gib, "fits": self.fits,
            "steps": self.steps, "seconds": self.seconds,
            "time_source": self.time_source,
            "probe": None if self.probe is None else {"steps": self.probe.steps, "tokens": self.probe.tokens,
                                                      "seconds": round(self.probe.seconds, 2),
                                                      "tokens_per_second": round(self.probe.tokens_per_second, 1)},
            "usd_per_hour": self.usd_per_hour, "price_source": self.price_source,
            "cost_usd": self.cost_usd,
            "notes": self.notes,
        }


def estimate_run(cfg: RunConfig, gpu: str | None = None, probe: bool = True, probe_steps: int = 3,
                 price_per_hour: float | None = None, prices_file: Path | None = None) -> Estimate:
    import torch

    from tunelab.chat import run_tokenizer
    from tunelab.estimate.shape import model_shape
    from tunelab.models import Precision, pick_precision, resolve_model
    from tunelab.preflight import check_compatibility

    table = load_table(prices_file)
    accelerator = find_gpu(gpu, table) if gpu else None
    notes: list[str] = []
    if accelerator is not None:
        # bf16 (fp16 on T4) autocast, as tunelab picks on CUDA; both take 2 bytes a value
        chosen = Precision("cuda", None if cfg.model.dtype == "float32" else torch.bfloat16, torch.float32)
        precision = f"{accelerator.name}, weights float32, autocast {'off' if chosen.autocast_dtype is None else 'bf16'}"
    else:
        chosen = pick_precision(cfg.model)
        check_compatibility(cfg, chosen.device, None)
        precision = chosen.label
    policy = planned_policy(cfg, chosen)
    device = policy.device

    tokenizer = run_tokenizer(cfg)
    records, stats = _data_stats(cfg, tokenizer, notes, policy)
    folder = resolve_model(cfg.model)
    shape = model_shape(folder, cfg.method)
    work = workload(cfg, policy, stats, shape.vocab)
    if device == "cuda":
        overhead = CUDA_CONTEXT_BYTES
        notes.append("GPU peak = torch.cuda.max_memory_allocated (what tunelab records) + ~0.6 GiB CUDA context")
    else:
        overhead = baseline_rss_bytes(cfg.track.enabled, cfg.method.type == "qlora", folder)
    memory = breakdown(shape, work, overhead, cpu_heap=device == "cpu")

    steps = cfg.train.max_steps or math.ceil(stats.steps_per_epoch * cfg.train.epochs)
    epoch_share = steps / max(stats.steps_per_epoch, 1)
    # In the probe's unit: tokens our collators count (padding included where training pads), or for TRL's
    # trainers the data's own tokens.
    padded = not policy.padding_free and cfg.objective.type not in TRL_OBJECTIVES
    run_tokens = (stats.padded_tokens if padded else stats.tokens) * epoch_share
    seconds: float | None = None
    result: ProbeResult | None = None
    if accelerator is not None:
        seconds = _gpu_seconds(shape, cfg, run_tokens, steps, accelerator)
        source = f"{accelerator.name} bf16 peak at {ASSUMED_MFU:.0%} utilization (not measured here)"
    elif probe:
        result = probe_training(cfg, records, probe_steps)
        seconds = run_tokens / result.tokens_per_second if result.tokens_per_second else None
        source = f"probe: {result.steps} measured steps, {result.tokens_per_second:.0f} tokens/s on this machine"
    else:
        source = "not estimated (--no-probe)"
    if price_per_hour is not None:
        usd, price_source = price_per_hour, "--price-per-hour"
    elif accelerator is not None:
        usd, price_source = accelerator.usd_per_hour, f"{PRICES_SOURCE}, {PRICES_DATE}"
    else:
        usd, price_source = CPU_USD_PER_HOUR, f"a 2-vCPU instance, indicative on-demand price, {PRICES_DATE}"
    return Estimate(device=device, precision=precision, shape=shape, data=stats, memory=memory,
                    memory_limit_gib=accelerator.memory_gib if accelerator else None, steps=steps, seconds=seconds,
                    time_source=source, usd_per_hour=usd, price_source=price_source, probe=result, notes=notes)


def planned_policy(cfg: RunConfig, precision: Precision) -> TrainingPolicy:
    """The training path the run will take, on `precision`'s device with as many processes as `cfg` plans.
    Models the estimate knows (Llama-style decoders, shape.py) have the plain head the chunked loss needs."""
    return training_policy(cfg, precision, planned_world_size(cfg), model_supports_chunked_loss=True)


def workload(cfg: RunConfig, policy: TrainingPolicy, stats: DataStats, vocab: int) -> Workload:
    """What one worker's largest training step computes, the way `policy` trains it."""
    from tunelab.losses import chunk_rows

    return Workload(
        method=cfg.method.type, tokens=stats.peak_tokens, attention_span=stats.attention_span,
        attention_probs=stats.attention_probs, grouped_kv_tokens=stats.grouped_kv_tokens,
        target_tokens=stats.peak_targets,
        compute_bytes=4 if policy.autocast_dtype is None else 2,
        gradient_checkpointing=cfg.train.gradient_checkpointing, chunked_loss=not policy.full_logits,
        dropout_mask_bytes=_dropout_mask_bytes(cfg, policy),
        fused_norms=cfg.train.fused_norm_rope and policy.device == "cpu",
        loss_chunk_rows=chunk_rows(vocab, policy.device, head_trains=cfg.method.type == "full"),
    )


def _dropout_mask_bytes(cfg: RunConfig, policy: TrainingPolicy) -> int:
    """Bytes a LoRA dropout keeps per element for backward (tunelab.train.dropout: a bool mask; the lean CPU
    LoRA forward keeps it as 0/1 in the compute dtype, tunelab.train.lora_forward)."""
    if cfg.method.dropout == 0:
        return 0
    if not (cfg.train.integer_dropout_masks and cfg.method.type in ("lora", "qlora")):
        return FP32
    compute = policy.autocast_dtype
    lean = cfg.train.lean_lora_forward and cfg.method.type == "lora" and not cfg.method.use_dora
    return compute.itemsize if lean and policy.device == "cpu" and compute is not None else 1


def _data_stats(cfg: RunConfig, tokenizer: Any, notes: list[str],
                policy: TrainingPolicy) -> tuple[list[Any], DataStats]:
    """Token lengths of the training split exactly as training will see it (same validation, cleaning,
    dedup, split and tokenization), and the largest batch they can form."""
    from tunelab.data.prepare import build_dataset
    from tunelab.data.tokens import token_counter

    dataset = build_dataset(cfg, tokenizer, generate_replay=False).dataset
    records = dataset.train
    if cfg.objective.type in ("sft", "cpt"):
        from tunelab.train.sft import encode_split

        encoded, _ = encode_split(cfg, tokenizer, records)
        lengths = [len(e["input_ids"]) for e in encoded]
        targets = [sum(1 for t in e["labels"] if t != -100) for e in encoded]
    else:
        lengths = [min(n, cfg.data.max_length) for n in token_counter(tokenizer, cfg.data.system_prompt)(records)]
        targets = list(lengths)
        if cfg.objective.type in PAIRED_OBJECTIVES:
            lengths, targets = [2 * n for n in lengths], [2 * n for n in targets]  # chosen and rejected
        notes.append(f"objective {cfg.objective.type}: memory approximated from sequence lengths (TRL trainer)")
    if cfg.data.packing and cfg.objective.type in ("sft", "cpt"):
        rows = math.ceil(sum(lengths) / cfg.data.max_length)
        lengths, targets = [cfg.data.max_length] * rows, [cfg.data.max_length] * rows
    if cfg.method.type in VIRTUAL_TOKEN_METHODS:
        lengths = [n + cfg.method.num_virtual_tokens for n in lengths]
    b = cfg.train.batch_size
    longest = sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True)[:b]
    if policy.padding_free:
        peak_tokens = sum(lengths[k] for k in longest)
    else:
        peak_tokens = min(b, len(lengths)) * max(lengths)
    # Per-example attention (tunelab.train.attention): each example attends on its own, no mask is built.
    span = 0 if policy.per_example_attention else max(lengths)
    per_example = policy.per_example_attention
    probs = sum(saved_probabilities(lengths[k], policy.device) for k in longest) if per_example else 0
    grouped = sum(lengths[k] for k in longest if attends_textbook(lengths[k], policy.device)) if per_example else 0
    per_step = b * cfg.train.gradient_accumulation_steps
    stats = DataStats(
        examples=len(lengths), tokens=sum(lengths), padded_tokens=_padded_tokens(lengths, b, cfg.train.seed),
        steps_per_epoch=max(1, math.ceil(len(lengths) / per_step)), peak_tokens=peak_tokens, attention_span=span,
        attention_probs=probs, grouped_kv_tokens=grouped, peak_targets=sum(targets[k] for k in longest),
        max_length=max(lengths),
    )
    return records, stats


def _padded_tokens(lengths: list[int], batch_size: int, seed: int) -> int:
    """Tokens processed in an epoch of shuffled, padded batches (each batch as long as its longest row)."""
    import random

    order = list(lengths)
    random.Random(seed).shuffle(order)
    return sum(batch_size * max(order[i:i + batch_size]) for i in range(0, len(order), batch_size))


def _gpu_seconds(shape: ModelShape, cfg: RunConfig, tokens: float, steps: int, gpu: Accelerator) -> float:
    """Matmul FLOPs per token: forward 2 x weights; backward 2 x weights for the input gradient, plus 2 x for
    the weight gradient of what trains; recomputation repeats the forward under checkpointing."""
    weights = shape.base_params
    flops_per_token = 2 * weights + 2 * weights + 2 * shape.trainable_params
    if cfg.train.gradient_checkpointing:
        flops_per_token += 2 * weights
    compute = tokens * flops_per_token / (gpu.bf16_tflops * 1e12 * ASSUMED_MFU)
    floor = steps * cfg.train.gradient_accumulation_steps * shape.layers * MIN_SECONDS_PER_LAYER_STEP
    return max(compute, floor)
