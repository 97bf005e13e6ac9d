"""Benchmark: DPO throughput, memory and loss, TRL's defaults against tunelab's, side by side.

    python bench/dpo_throughput.py [--pairs 96] [--repeats 2] [--out bench/results/dpo_throughput.json]
    python bench/dpo_throughput.py --variants trl tunelab "no-precompute=objective.precompute_ref=false"
    python bench/dpo_throughput.py --variants trl-orpo "orpo=objective.type=orpo" trl-simpo "simpo=objective.type=simpo"

Both sides train the default model (LoRA r=16, alpha 32, dropout 0.05 on all linear projections; the
reference is the base with the adapter switched off) with DPO (sigmoid, beta 0.1), 8 pairs a step,
lr 1e-4 cosine, seed 42, one epoch, max_length 1024, on the same deterministic pairs with long-tailed lengths:

- trl: `trl.DPOTrainer` with a `DPOConfig` left at its defaults but for those settings (so bf16 autocast
  and gradient checkpointing on, the reference log-probs computed at every step);
- trl-orpo, trl-simpo: TRL's experimental `ORPOTrainer` / `CPOTrainer` (SimPO: loss_type simpo, cpo_alpha 0,
  gamma 0.5 as tunelab's default), likewise at their defaults but for those settings (bf16, checkpointing on);
- trl-kto: `trl.KTOTrainer` likewise, on the pairs unpaired (each chosen answer a desirable row, each rejected
  one an undesirable row: the same tokens), as tunelab's `objective.type=kto` variant reads them;
- tunelab: `tunelab.train.preference.train_preference` with a default RunConfig;
- any other variant: tunelab with overrides (the ablation).

Each side runs in its own process, variants interleaved per repeat. Reported: tokens/s (prompt + chosen and
prompt + rejected tokens of every pair, over the whole `train()` call, reference pass included), peak
memory, mean train loss, and on 32 held-out pairs the DPO loss and preference accuracy, computed the same
way for every side (float32).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import LORA, WORDS, add_side_arguments, parse_variants, run_side  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HYPER = {"learning_rate": 1e-4, "batch_size": 8, "epochs": 1, "lr_scheduler": "cosine", "warmup_ratio": 0.03,
         "seed": 42}
BETA = 0.1
MAX_LENGTH = 1024
TRL_SIDES = {"trl": "dpo", "trl-orpo": "orpo", "trl-simpo": "simpo", "trl-kto": "kto"}  # side -> its objective
SIMPO_GAMMA = 0.5  # tunelab's default objective.simpo_gamma


def make_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """Preference rows: reverse the words (chosen) or repeat them in order (rejected); lengths long-tailed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tokens = min(600, max(20, int(rng.lognormvariate(math.log(110), 0.75))))
        words = [rng.choice(WORDS) for _ in range(max(2, (tokens - 40) // 2))]
        rows.append({"id": f"pair-{seed}-{i}",
                     "prompt": [{"role": "user", "content": "Write these words in reverse order: " + " ".join(words)}],
                     "chosen": " ".join(reversed(words)), "rejected": " ".join(words)})
    return rows


def _encode(tokenizer: Any, prompt: list[dict[str, str]], answer: str) -> tuple[list[int], int]:
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=False)
    return list(full), len(prompt_ids)


def unpaired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's rows from preference pairs: the chosen answer desirable, the rejected one not (pair order kept)."""
    return [{"id": f"{r['id']}-{side}", "prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in rows for side in ("chosen", "rejected")]


def pair_tokens(tokenizer: Any, rows: list[dict[str, Any]]) -> int:
    return sum(len(_encode(tokenizer, r["prompt"], r[side])[0]) for r in rows for side in ("chosen", "rejected"))


def heldout_dpo(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """DPO loss and accuracy of the trained policy against the base (adapter off), in float32."""
    import torch
    import torch.nn.functional as F

    model.float().eval()

    def logp(ids: list[int], start: int) -> float:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        picked = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1)
        return float(picked[start - 1 :].sum())

    losses, wins = [], 0
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for r in rows:
            enc = {side: _encode(tokenizer, r["prompt"], r[side]) for side in ("chosen", "rejected")}
            policy = {side: logp(*enc[side]) for side in enc}
            with model.disable_adapter():
                ref = {side: logp(*enc[side]) for side in enc}
            margin = BETA * ((policy["chosen"] - ref["chosen"]) - (policy["rejected"] - ref["rejected"]))
            losses.append(float(-F.logsigmoid(torch.tensor(margin))))
            wins += margin > 0
    return {"eval_loss": statistics.mean(losses), "eval_accuracy": wins / len(rows)}


# ------------------------------------------------------------------------------------------ one side


def run_trl(data: Path, work: Path, objective: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset as HFDataset
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from tunelab.config import ModelConfig
    from tunelab.models import Precision, load_model, load_tokenizer, resolve_model

    if objective == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        options: dict[str, Any] = {}
    elif objective == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        options = {}
    elif objective == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

        options = {}
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        options = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": SIMPO_GAMMA}
    base = resolve_model(ModelConfig())
    tokenizer = load_tokenizer(base)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    trl_rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    if objective == "kto":
        trl_rows = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}],
                     "label": r["label"]} for r in unpaired(rows)]
    set_seed(HYPER["seed"])
    model = load_model(base, Precision("cpu", None, torch.float32))
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = Config(output_dir=str(work / "trl"), per_device_train_batch_size=HYPER["batch_size"],
                  learning_rate=HYPER["learning_rate"], lr_scheduler_type=HYPER["lr_scheduler"],
                  warmup_steps=HYPER["warmup_ratio"], num_train_epochs=HYPER["epochs"], seed=HYPER["seed"],
                  beta=BETA, max_length=MAX_LENGTH, save_strategy="no", report_to="none", disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available(),  # TRL refuses its default bf16 on CPU without it
                  **options)
    trainer = Trainer(model=model, args=args, train_dataset=HFDataset.from_list(trl_rows), processing_class=tokenizer)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steps": output.global_step, "train_loss": float(output.training_loss),
            "precision": f"bf16={args.bf16}, checkpointing={args.activation_checkpointing}",
            **heldout_dpo(model, tokenizer, _heldout(data))}


def run_tunelab(data: Path, work: Path, overrides: list[str]) -> dict[str, Any]:
    from tunelab.artifacts import RunPaths
    from tunelab.config_file import validate_config
    from tunelab.data.load import load_records
    from tunelab.data.prepare import Dataset
    from tunelab.models import load_tokenizer
    from tunelab.train.preference import train_preference

    config: dict[str, Any] = {
        "data": {"train": str(data / "train.jsonl"), "max_length": MAX_LENGTH}, "method": LORA,
        "objective": {"type": "dpo", "beta": BETA}, "train": {**HYPER, "save_steps": None},
        "track": {"enabled": False}, "output": {"dir": str(work / "tunelab")},
    }
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    if config["objective"]["type"] == "kto":
        config["data"]["train"] = str(data / "train_kto.jsonl")
    cfg = validate_config(config)
    started = time.perf_counter()
    records = load_records(Path(config["data"]["train"]))
    result = train_preference(cfg, RunPaths(cfg.output.dir), Dataset(records, [], []))
    seconds = time.perf_counter() - started - 0.0
    tokenizer = load_tokenizer(RunPaths(cfg.output.dir).adapter)
    return {"seconds": result.train_seconds, "seconds_with_setup": round(seconds, 1), "steps": result.steps,
            "train_loss": result.train_loss, "precision": result.precision,
            **heldout_dpo(result.model, tokenizer, _heldout(data))}


def _heldout(data: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]


def one_side(name: str, overrides: list[str], data: Path) -> None:
    import torch

    from tunelab.measure import peak_memory_mb

    work = Path(tempfile.mkdtemp(prefix=f"tunelab-dpo-{name}-"))
    out = run_trl(data, work, TRL_SIDES[name]) if name in TRL_SIDES else run_tunelab(data, work, overrides)
    tokens = json.loads((data / "shape.json").read_text())["tokens"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.update(tokens=tokens, tokens_per_second=round(tokens / out["seconds"], 1),
               peak_memory_mb=round(peak_memory_mb(device), 1))
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=["trl", "tunelab"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dpo_throughput.json")
    add_side_arguments(parser)
    args = parser.parse_args()
    if args.side:
        one_side(args.side, args.overrides, args.data)
        return

    from tunelab.config import ModelConfig
    from tunelab.models import tokenizer_for

    variants = {name: o for spec in args.variants
                for name, o in ({spec: []} if spec in TRL_SIDES else parse_variants([spec])).items()}
    data = Path(tempfile.mkdtemp(prefix="tunelab-dpo-data-"))
    train, heldout = make_pairs(args.pairs, seed=1), make_pairs(32, seed=2)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (data / "train_kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired(train)))
    (data / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    shape = {"pairs": len(train), "tokens": pair_tokens(tokenizer_for(ModelConfig()), train)}
    (data / "shape.json").write_text(json.dumps(shape))
    print(f"data: {json.dumps(shape)}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, overrides in variants.items():
            runs[name].append(run_side(__file__, name if name in TRL_SIDES else "tunelab", name, data, overrides))
            r = runs[name][-1]
            print(f"[{repeat + 1}/{args.repeats}] {name}: {r['tokens_per_second']:.0f} tok/s, "
                  f"{r['peak_memory_mb']:.0f} MiB, train loss {r['train_loss']:.4f}, held-out DPO loss "
                  f"{r['eval_loss']:.4f}, accuracy {r['eval_accuracy']:.2f}, {r['seconds']:.0f} s", flush=True)

    keys = ("tokens_per_second", "peak_memory_mb", "train_loss", "eval_loss", "eval_accuracy", "seconds")
    summary = {name: {**{k: round(statistics.median(r[k] for r in rs), 4) for k in keys},
                      "tokens_per_second_range": [min(r["tokens_per_second"] for r in rs),
                                                  max(r["tokens_per_second"] for r in rs)],
                      "steps": rs[0]["steps"], "precision": rs[0]["precision"], "repeats": rs}
               for name, rs in runs.items()}
    result: dict[str, Any] = {"data": shape, "hyperparameters": {**HYPER, "beta": BETA, "max_length": MAX_LENGTH},
                              "lora": LORA, "variants": variants, "results": summary}
    # Each tunelab variant against the TRL side of its objective, where one ran.
    reference_of = {objective: name for name, objective in TRL_SIDES.items() if name in summary}
    for name, overrides in variants.items():
        objective = next((o.split("=", 1)[1] for o in overrides if o.startswith("objective.type=")), "dpo")
        ref_name = reference_of.get(objective)
        if name in TRL_SIDES or ref_name is None:
            continue
        s, ref = summary[name], summary[ref_name]
        result.setdefault("vs_trl", {})[name] = {
            "against": ref_name, "tokens_per_second_x": round(s["tokens_per_second"] / ref["tokens_per_second"], 2),
            "peak_memory_x": round(s["peak_memory_mb"] / ref["peak_memory_mb"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| side | tok/s (median, range) | peak MiB | train loss | held-out DPO loss | accuracy | steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        low, high = s["tokens_per_second_range"]
        print(f"| {name} | {s['tokens_per_second']:.0f} ({low:.0f}-{high:.0f}) | {s['peak_memory_mb']:.0f} | "
              f"{s['train_loss']:.4f} | {s['eval_loss']:.4f} | {s['eval_accuracy']:.2f} | {s['steps']} |")
    for name, ratio in result.get("vs_trl", {}).items():
        print(f"{name} vs {ratio['against']}: {ratio['tokens_per_second_x']}x tokens/s, "
              f"{ratio['peak_memory_x']}x peak memory")


if __name__ == "__main__":
    main()
