"""Benchmark: SFT throughput, memory and loss: the plain recipe, TRL's SFTTrainer and tunelab's defaults, side by side.

    python bench/train_throughput.py [--target-tokens 24000] [--repeats 3] [--batch-size 8] [--out ...json]
    python bench/train_throughput.py --variants plain tunelab "fp32-padfree=model.dtype=float32,train.chunked_loss=false"

Every side trains the default model (LoRA r=16, alpha 32, dropout 0.05 on all linear projections, batch 8,
lr 2e-4 cosine, 3% warmup, seed 42, one epoch) on the same deterministic chat data whose lengths are
long-tailed between 20 and 600 tokens, so all see exactly the same examples and target tokens:

- plain: transformers Trainer + PEFT, the collator `tokenizer.pad(batch, padding=True)` (labels padded with
  -100), default TrainingArguments (float32 on CPU), no packing;
- trl: TRL's `SFTTrainer` set up for speed as its documentation recommends: `padding_free=True`, bf16 where the
  hardware runs it fast (tunelab's rule), gradient checkpointing off (TRL's default is on), the loss on the
  answers only through a pre-tokenized `completion_mask` built from tunelab's labels; its collated batches are
  checked to hold exactly tunelab's tokens, labels and positions before it trains;
- tunelab: `tunelab.train.sft.train_sft` with a default RunConfig (only the shared hyperparameters above set);
- any other variant: tunelab with `--set`-style overrides (the ablation).

Each side runs in its own process (peak RSS is per process), variants interleaved per repeat (a, b, c, a, b, c)
because other work shares the cores; the JSON keeps every repeat and the median. Reported: non-pad
tokens/s over the training loop, peak memory (RSS on CPU, max allocated on CUDA; over the whole process and,
as peak_memory_train_mb, before the shared float32 eval pass), mean train loss,
eval loss on 64 held-out examples computed the same way for every side (float32, padded batches), and model
FLOPs utilization: the data's LoRA-training FLOPs per token (bench/model_flops.py: causal attention, the
output head at target positions) x median tokens/s / the peak GFLOP/s that bench/matmul_peak.py measured for
the side's compute dtype (bench/results/matmul_peak.json; run it first on the same machine).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_flops import lora_training_flops, mfu  # noqa: E402
from sft_trl import run_trl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud tiger window garden silver mountain candle paper orange music rocket "
         "forest yellow bridge castle dragon pencil summer winter ocean planet violet copper lemon "
         "falcon harbor meadow thunder marble velvet shadow crystal lantern island compass").split()
HYPER = {"learning_rate": 2e-4, "batch_size": 8, "epochs": 1, "lr_scheduler": "cosine", "warmup_ratio": 0.03,
         "seed": 42}
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def make_rows(n_rows: int, seed: int) -> list[dict[str, Any]]:
    """Chat rows whose length (prompt + answer, about 1 token a word, plus ~40 for the template and default
    system prompt) follows a log-normal distribution clipped to 20..600 tokens: median ~115, a long tail, as
    in real instruction sets. The task (write the words back in reverse order) is learnable: the loss falls."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        tokens = min(600, max(20, int(rng.lognormvariate(math.log(110), 0.75))))
        n_words = max(1, (tokens - 40) // 2)  # ~1 token a word, half prompt, half answer; template + system ~40
        words = [rng.choice(WORDS) for _ in range(n_words)]
        rows.append({"id": f"row-{seed}-{i}", "messages": [
            {"role": "user", "content": "Write these words in reverse order: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def write_data(folder: Path, target_tokens: int) -> dict[str, Any]:
    """train.jsonl holding just enough rows for `target_tokens` assistant tokens, and eval.jsonl (64 rows)."""
    from tunelab.chat import encode_records
    from tunelab.config import ModelConfig
    from tunelab.data.load import load_records
    from tunelab.models import tokenizer_for

    tokenizer = tokenizer_for(ModelConfig())
    candidates = make_rows(20000, seed=1)
    (folder / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in candidates))
    examples, _ = encode_records(tokenizer, load_records(folder / "all.jsonl"), None, 2048)
    kept, targets = [], 0
    for row, ex in zip(candidates, examples):
        if targets >= target_tokens:
            break
        kept.append((row, ex))
        targets += sum(1 for label in ex["labels"][1:] if label != -100)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row, _ in kept))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(64, seed=2)))
    lengths = sorted(len(ex["input_ids"]) for _, ex in kept)
    flops = lora_training_flops(model_config(), LORA["r"], lengths, head_tokens=targets)
    return {"examples": len(kept), "target_tokens": targets, "tokens": sum(lengths), "min": lengths[0],
            "median": lengths[len(lengths) // 2], "p90": lengths[int(0.9 * len(lengths))], "max": lengths[-1],
            "model_flops": flops.to_json()}


def model_config() -> Any:
    from transformers import AutoConfig

    from tunelab.config import ModelConfig
    from tunelab.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(ModelConfig()))


# ------------------------------------------------------------------------------------------ one side


def eval_loss(model: Any, tokenizer: Any, data: Path) -> float:
    import torch

    from tunelab.chat import encode_records
    from tunelab.data.load import load_records
    from tunelab.losses import mean_token_loss

    examples, _ = encode_records(tokenizer, load_records(data / "eval.jsonl"), None, 2048)
    model.float()
    with torch.autocast("cpu", enabled=False):
        # One example at a time: the eval pass must not set either side's peak memory (8 padded rows of fp32
        # logits over a 49k vocabulary take ~2 GB, more than tunelab's whole training step).
        return mean_token_loss(model, examples, tokenizer.pad_token_id, batch_size=1)


def run_plain(data: Path, work: Path) -> dict[str, Any]:
    """The plain recipe: Trainer + PEFT LoRA, pad to the longest in each batch, default TrainingArguments."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from tunelab.chat import encode_records
    from tunelab.config import ModelConfig
    from tunelab.data.load import load_records
    from tunelab.measure import peak_memory_mb
    from tunelab.models import Precision, load_model, load_tokenizer, resolve_model

    base = resolve_model(ModelConfig())
    tokenizer = load_tokenizer(base)
    examples, _ = encode_records(tokenizer, load_records(data / "train.jsonl"), None, 2048)
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    counted = {"tokens": 0}

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        padded = tokenizer.pad([{"input_ids": b["input_ids"]} for b in batch], padding=True, return_tensors="pt")
        width = padded["input_ids"].shape[1]
        padded["labels"] = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        counted["tokens"] += int(padded["attention_mask"].sum())
        return padded

    set_seed(HYPER["seed"])
    model = load_model(base, Precision("cpu", None, torch.float32))
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(work / "plain"), per_device_train_batch_size=HYPER["batch_size"],
        learning_rate=HYPER["learning_rate"], lr_scheduler_type=HYPER["lr_scheduler"],
        warmup_steps=HYPER["warmup_ratio"], num_train_epochs=HYPER["epochs"], seed=HYPER["seed"],
        data_seed=HYPER["seed"], logging_steps=1, save_strategy="no", report_to="none",
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_memory_train_mb": round(peak_memory_mb("cpu"), 1),
            "tokens": counted["tokens"], "steps": output.global_step,
            "train_loss": float(output.training_loss), "eval_loss": eval_loss(model, tokenizer, data),
            "precision": "cpu, float32", "compute_dtype": "float32"}


def _value(text: str) -> object:
    """An override's value: JSON where it parses (numbers, true, lists), else the string (float32)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_tunelab(data: Path, work: Path, overrides: list[str]) -> dict[str, Any]:
    """tunelab's SFT path as a user gets it: train_sft with a RunConfig built from defaults."""
    from tunelab.artifacts import RunPaths
    from tunelab.config_file import validate_config
    from tunelab.data.load import load_records
    from tunelab.data.prepare import Dataset
    from tunelab.train.sft import train_sft

    config = {"data": {"train": str(data / "train.jsonl")}, "method": LORA, "train": {**HYPER, "save_steps": None},
              "track": {"enabled": False}, "output": {"dir": str(work / "tunelab")}}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = _value(value)
    cfg = validate_config(config)
    result = train_sft(cfg, RunPaths(cfg.output.dir), Dataset(load_records(data / "train.jsonl"), [], []))
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(RunPaths(cfg.output.dir).adapter)
    return {"seconds": result.train_seconds, "peak_memory_train_mb": result.peak_memory_mb,
            "tokens": result.tokens_seen, "steps": result.steps,
            "train_loss": result.train_loss, "eval_loss": eval_loss(result.model, tokenizer, data),
            "precision": result.precision, "compute_dtype": compute_dtype(result.precision)}


def compute_dtype(precision_label: str) -> str:
    """The dtype the matmuls run in, from tunelab's precision label ("cpu, weights float32, autocast bfloat16")."""
    weights, _, autocast = precision_label.partition("autocast ")
    return autocast if autocast and autocast != "off" else weights.split("weights ")[-1].strip(", ")


def one_side(name: str, overrides: list[str], data: Path) -> None:
    import torch

    from tunelab.measure import peak_memory_mb

    work = Path(tempfile.mkdtemp(prefix=f"tunelab-bench-{name}-"))
    sides = {"plain": lambda: run_plain(data, work), "trl": lambda: run_trl(data, work, HYPER, LORA, eval_loss)}
    out = sides[name]() if name in sides else run_tunelab(data, work, overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.update(peak_memory_mb=round(peak_memory_mb(device), 1), threads=torch.get_num_threads(),
               tokens_per_second=round(out["tokens"] / out["seconds"], 1))
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ driver


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """"plain", "trl", "tunelab", or "NAME=section.key=value,section.key=value" (tunelab with overrides)."""
    variants = {}
    for spec in specs:
        if spec in ("plain", "trl", "tunelab"):
            variants[spec] = []
        else:
            name, _, rest = spec.partition("=")
            variants[name] = [s for s in rest.split(",") if s]
    return variants


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("tokens_per_second", "peak_memory_mb", "train_loss", "eval_loss", "seconds")
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}
    out["tokens_per_second_range"] = [min(r["tokens_per_second"] for r in runs), max(r["tokens_per_second"] for r in runs)]
    out.update(steps=runs[0]["steps"], tokens=runs[0]["tokens"], precision=runs[0]["precision"],
               compute_dtype=runs[0]["compute_dtype"], repeats=runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target-tokens", type=int, default=24000, help="assistant (target) tokens per side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=HYPER["batch_size"])
    parser.add_argument("--variants", nargs="*", default=["plain", "trl", "tunelab"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    parser.add_argument("--peaks", type=Path, default=ROOT / "bench" / "results" / "matmul_peak.json",
                        help="bench/matmul_peak.py's JSON: the peak GFLOP/s that MFU divides by")
    add_side_arguments(parser)
    args = parser.parse_args()
    HYPER["batch_size"] = args.batch_size
    if args.side:
        one_side(args.side, args.overrides, args.data)
        return

    variants = parse_variants(args.variants)
    data = Path(tempfile.mkdtemp(prefix="tunelab-bench-data-"))
    shape = write_data(data, args.target_tokens)
    print(f"data: {json.dumps(shape)}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, overrides in variants.items():
            side = name if name in ("plain", "trl") else "tunelab"
            runs[name].append(run_side(__file__, side, name, data, overrides, "--batch-size", str(args.batch_size)))
            r = runs[name][-1]
            print(f"[{repeat + 1}/{args.repeats}] {name}: {r['tokens_per_second']:.0f} tok/s, "
                  f"{r['peak_memory_mb']:.0f} MiB, train loss {r['train_loss']:.4f}, eval loss {r['eval_loss']:.4f}, "
                  f"{r['steps']} steps in {r['seconds']:.0f} s", flush=True)
            # Written after every side, so a run cut short still leaves what it measured.
            result = report(args.out, shape, variants, {n: rs for n, rs in runs.items() if rs}, args.peaks)
    print("\n| side | non-pad tok/s (median, range) | peak MiB | train loss | eval loss | steps | dtype | MFU |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, s in result["results"].items():
        low, high = s["tokens_per_second_range"]
        util = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        print(f"| {name} | {s['tokens_per_second']:.0f} ({low:.0f}-{high:.0f}) | {s['peak_memory_mb']:.0f} "
              f"| {s['train_loss']:.4f} | {s['eval_loss']:.4f} | {s['steps']} | {s['compute_dtype']} | {util} |")
    for reference in ("plain", "trl"):
        for name, ratio in result.get(f"vs_{reference}", {}).items():
            print(f"{name} vs {reference}: {ratio['tokens_per_second_x']}x tokens/s, {ratio['peak_memory_x']}x peak "
                  f"memory, eval loss {ratio['eval_loss_diff_pct']:+.2f}%")


def add_side_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options with which a benchmark runs itself as one side (see run_side)."""
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)


def run_side(script: str, side: str, name: str, data: Path, overrides: list[str], *extra: str) -> dict[str, Any]:
    """Run one side of a benchmark in its own process (peak RSS is per process) and read its RESULT line."""
    command = [sys.executable, script, "--side", side, "--data", str(data), *extra, "--overrides", *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{name} failed (exit {done.returncode}; -9 is the out-of-memory killer):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(out: Path, shape: dict[str, Any], variants: dict[str, list[str]],
           runs: dict[str, list[dict[str, Any]]], peaks: Path) -> dict[str, Any]:
    summary = {name: summarize(rs) for name, rs in runs.items()}
    peak_gflops = json.loads(peaks.read_text())["peak_gflops"] if peaks.is_file() else {}
    per_token = shape["model_flops"]["per_token"]
    for s in summary.values():
        peak = peak_gflops.get(s["compute_dtype"])
        s.update(peak_gflops=peak, mfu=round(mfu(per_token, s["tokens_per_second"], peak), 4) if peak else None)
    result: dict[str, Any] = {"data": shape, "hyperparameters": HYPER, "lora": LORA, "variants": variants,
                              "mfu_peaks_from": peaks.name if peak_gflops else None, "results": summary}
    for reference in ("plain", "trl"):
        if reference in summary and set(summary) - {"plain", reference}:
            ref = summary[reference]
            result[f"vs_{reference}"] = {
                name: {"tokens_per_second_x": round(s["tokens_per_second"] / ref["tokens_per_second"], 2),
                       "peak_memory_x": round(s["peak_memory_mb"] / ref["peak_memory_mb"], 2),
                       "eval_loss_diff_pct": round(100 * (s["eval_loss"] / ref["eval_loss"] - 1), 2)}
                for name, s in summary.items() if name not in ("plain", reference)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
