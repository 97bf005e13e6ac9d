"""The eval stage: base vs tuned on the held-out split -> eval/metrics.json, predictions, report.md.

The base model is loaded once; "base" is the same weights with the adapter disabled, so both systems
see the very same prompt, rendered with the chat template saved beside the adapter.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir, manifest, write_json_atomic, write_jsonl_atomic, write_text_atomic
from tunelab.chat import encode_records, render_prompt, with_system_prompt
from tunelab.config import RunConfig
from tunelab.data.prepare import load_dataset
from tunelab.data.records import Record
from tunelab.errors import RunFolderError
from tunelab.eval.generate import generate_greedy
from tunelab.eval.loss import mean_token_loss, perplexity
from tunelab.eval.metrics import exact_match, exact_match_rate
from tunelab.eval.report import render_markdown
from tunelab.models import Precision, load_tokenizer, pick_device, resolve_model
from tunelab.train.adapters import load_trained

SYSTEMS = ("base", "tuned")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]


def trained_folder(run: RunPaths) -> Any:
    """Where the run's trained weights and their tokenizer live: adapter/ (PEFT) or model/ (full)."""
    return run.adapter if (run.adapter / "adapter_config.json").is_file() else run.root / "model"


def as_chat(record: Record) -> Record | None:
    """The test row as prompt + reference answer: the chosen answer of a pair, a KTO row's answer when it is
    labelled good; None where there is no reference (bad KTO answers, raw text)."""
    if record.kind == "chat":
        return record
    answer = record.chosen if record.kind == "preference" else record.completion if record.label else None
    if answer is None or record.kind == "text":
        return None
    return Record(record.id, record.source, "chat", [*record.messages, {"role": "assistant", "content": answer}])


def evaluate_reward_run(cfg: RunConfig, run: RunPaths) -> EvalResult:
    """A reward model is judged by how often it ranks the chosen answer above the rejected one."""
    from tunelab.train.reward_model import load_reward_model, pairwise_accuracy

    test = load_dataset(run.data).test
    if not test:
        raise RunFolderError(f"{run.data}: the test split is empty; add data.test files or raise data.test_fraction")
    accuracy = pairwise_accuracy(load_reward_model(run.root), load_tokenizer(run.adapter), test)
    metrics = manifest("eval", n_examples=len(test), systems={"tuned": {"pairwise_accuracy": accuracy}})
    with atomic_dir(run.eval) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        write_text_atomic(tmp / "report.md", f"# Reward model: {run.root.name}\n\nPairwise accuracy on "
                          f"{len(test)} held-out pairs: {accuracy:.1%}\n")
    return EvalResult(metrics=metrics, rows=[])


def evaluate_run(cfg: RunConfig, run: RunPaths) -> EvalResult:
    import torch

    if cfg.objective.type == "reward":
        return evaluate_reward_run(cfg, run)

    # Evaluate in float32 without autocast: eval numbers must not depend on the training precision.
    precision = Precision(pick_device(cfg.model.device), None, torch.float32)
    model, separate_base = load_trained(cfg, run.root, resolve_model(cfg.model), precision)
    tokenizer = load_tokenizer(trained_folder(run))  # the exact template used in training
    test = [c for c in (as_chat(r) for r in load_dataset(run.data).test) if c is not None]
    if cfg.eval.max_examples:
        test = test[: cfg.eval.max_examples]
    if not test:
        raise RunFolderError(f"{run.data}: the test split has no rows with a reference answer to evaluate against; "
                             "add data.test files or raise data.test_fraction")

    conversations = [with_system_prompt(r.messages[:-1], cfg.data.system_prompt) for r in test]
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    references = [r.messages[-1]["content"] for r in test]
    encoded, _ = encode_records(tokenizer, test, cfg.data.system_prompt, max_length=10**9)

    outputs: dict[str, list[str]] = {}
    systems: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for system in SYSTEMS:
        # PEFT runs: "base" is the same model with its adapter switched off; full fine-tunes: a second model.
        net = separate_base if system == "base" and separate_base is not None else model
        off = system == "base" and separate_base is None
        with model.disable_adapter() if off else contextlib.nullcontext():
            outputs[system] = generate_greedy(
                net, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, label=f"eval {system}"
            )
            loss = mean_token_loss(net, encoded, tokenizer.pad_token_id, cfg.eval.batch_size)
        systems[system] = {
            "exact_match": exact_match_rate(outputs[system], references),
            "eval_loss": loss,
            "perplexity": perplexity(loss),
            "mean_words": sum(len(o.split()) for o in outputs[system]) / len(outputs[system]),
        }
    seconds = time.perf_counter() - started

    rows = [
        {
            "id": record.id,
            "prompt": conversations[i][-1]["content"],
            "reference": references[i],
            **{system: outputs[system][i] for system in SYSTEMS},
            **{f"{system}_correct": exact_match(outputs[system][i], references[i]) for system in SYSTEMS},
        }
        for i, record in enumerate(test)
    ]
    metrics = manifest("eval", n_examples=len(test), systems=systems, eval_seconds=round(seconds, 2))
    with atomic_dir(run.eval) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        write_jsonl_atomic(tmp / "predictions.jsonl", rows)
        write_text_atomic(tmp / "report.md", render_markdown(metrics, rows, run.root.name))
    return EvalResult(metrics=metrics, rows=rows)

