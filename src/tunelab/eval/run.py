"""The eval stage: every suite x every system, forgetting probes, optional judge, gate, and the report.

The base model is loaded once. "base" is the tuned model with its adapter switched off, "few_shot" is that
base shown training examples first, other runs are extra adapters: all see prompts rendered with the chat
template saved beside the adapter, so no system gets a different template than it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from tunelab.artifacts import (
    RunPaths,
    atomic_dir,
    manifest,
    sha256_folder,
    sha256_text,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from tunelab.chat import (chat_tokenizer, encode_records, render_prompt, text_ids, token_ids,
                          with_system_prompt)
from tunelab.config import RunConfig, SuiteConfig
from tunelab.data.load import load_source
from tunelab.data.prepare import Dataset, load_dataset
from tunelab.data.records import Record
from tunelab.data.tokens import refused_by_template
from tunelab.errors import ConfigError, DataError, RunFolderError
from tunelab.eval.base_cache import cached_answers, embedding_fingerprint
from tunelab.eval.gate import gate_rules
from tunelab.eval.generate import generate_greedy, short_prompt_batch
from tunelab.eval.harness import check_harness, harness_problems, run_harness
from tunelab.eval.html import render_html
from tunelab.eval.metrics import corpus_bleu, resolve_metric
from tunelab.eval.probes import CATEGORIES, PROBES
from tunelab.eval.report import render_markdown
from tunelab.eval.result import EvalResult, gate_rows
from tunelab.eval.systems import Models, System, as_chat, build_systems, few_shot_examples, fit_shots
from tunelab.families import answer_part
from tunelab.families import stop_texts, stop_token_ids
from tunelab.losses import mean_token_loss, perplexity
from tunelab.models import Precision, base_identity, cache_root, device_name, pick_device, resolve_model
from tunelab.progress import console
from tunelab.train.methods import load_trained


def suite_records(cfg: RunConfig, suite: SuiteConfig, dataset: Dataset, tokenizer: Any) -> list[Record]:
    """The suite's examples: its files (checked against the run's training split, `dataset`) or the test split."""
    if suite.files:
        raw = [r for path in suite.files for r in load_source(path).records]
    else:
        raw = dataset.test
    if raw and all(r.kind == "text" for r in raw):
        records = raw  # held-out raw text (continued pre-training): scored by each system's loss on it
    else:
        records = [c for c in (as_chat(r) for r in raw) if c is not None]
    for record in records if suite.files else []:  # (data prep checked the test split the same way)
        refused = refused_by_template(record, tokenizer, cfg.data.system_prompt)
        if refused is not None:
            raise DataError(f"eval suite '{suite.name}': {record.source}: {refused}")
    if suite.files:
        records = _uncontaminated(cfg, suite, records, dataset.train)
    limit = suite.max_examples or cfg.eval.max_examples
    return records[:limit] if limit else records


def _uncontaminated(cfg: RunConfig, suite: SuiteConfig, records: list[Record], train: list[Record]) -> list[Record]:
    """A suite file's examples checked against what the run trained on, by data prep's own test and policy
    (data.contamination.action): the test split was checked when the data was prepared, suite files can be
    written or changed at any time after, so they are checked here, each time they are read."""
    from tunelab.data.contamination import EvalText, find_contamination

    contamination = cfg.data.contamination
    # Named by where each example was read (FILE:LINE): unique across the suite's files, as ids need not be.
    evals = [EvalText(r.source, f"eval suite '{suite.name}'", r.all_text(), r.prompt_text()) for r in records]
    hits = find_contamination(train, evals, contamination, cfg.data.dedup).hits
    leaked = {h.eval_id for h in hits}
    if not leaked:
        return records
    shown = "; ".join(f"{h.eval_id} ~ training row {h.train_id} ({h.kind})" for h in hits[:5])
    if contamination.action == "fail":
        raise DataError(f"eval suite '{suite.name}': {len(leaked)} examples overlap the training data: {shown}"
                        f"{' ...' if len(hits) > 5 else ''}; its scores would measure memory, not skill (set "
                        "data.contamination.action to drop them from the suite, or warn)")
    if contamination.action == "warn":
        console.print(f"[yellow]warning:[/] eval suite '{suite.name}': {len(leaked)} examples overlap the training "
                      f"data (kept: action is warn): {shown}")
        return records
    console.print(f"[yellow]warning:[/] eval suite '{suite.name}': {len(leaked)} examples overlap the training data "
                  "and are left out of it (data.contamination.action: drop)")
    return [r for r in records if r.source not in leaked]


def evaluate_run(cfg: RunConfig, run: RunPaths, folder: Path | None = None) -> EvalResult:
    """Evaluate the run and write its report to `folder` (default: the run's eval/, its evidence)."""
    # Benchmark tasks resolve and load their documents before any weights do: a task that cannot run stops here.
    task_manager = check_harness(cfg) if cfg.eval.harness is not None else None
    if cfg.objective.type == "reward":
        from tunelab.eval.reward_accuracy import evaluate_reward_run

        return evaluate_reward_run(cfg, run, folder or run.eval)
    metrics, rows = measure_run(cfg, run, task_manager=task_manager)
    return record_eval(cfg, run, metrics, rows, folder)


def measure_run(cfg: RunConfig, run: RunPaths, placement: str = "this process", task_manager: Any = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate and score (metrics, per-example rows), writing nothing: the part of an eval that needs the model,
    which a Ray worker's GPU can run (`placement` says where, with the device and host)."""
    import torch

    if task_manager is None and cfg.eval.harness is not None:
        task_manager = check_harness(cfg)
    # Which weights these numbers are about: the registry refuses to pair them with an adapter trained since.
    trained_sha256 = sha256_folder(run.trained)
    # Evaluate in float32 without autocast: eval numbers must not depend on the training precision.
    precision = Precision(pick_device(cfg.model.device), None, torch.float32)
    base_folder = resolve_model(cfg.model)
    tuned, separate_base = load_trained(cfg, run.root, base_folder, precision)
    models = Models(tuned, separate_base)
    if cfg.eval.cache_base_answers:
        models.answer_cache = (cache_root(cfg.model) / "eval", base_identity(base_folder))
    tokenizer = chat_tokenizer(run.trained, cfg.data.chat_template)  # the template used in training
    systems = build_systems(cfg, models)
    dataset = load_dataset(run.data)  # read once: the test split, the few-shot pool and the contamination check
    shots = few_shot_examples(dataset.train, cfg.eval.few_shot_k, cfg.eval.seed)
    torch.manual_seed(cfg.eval.seed)

    started, prompts_generated = time.perf_counter(), 0
    suites: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for suite in cfg.eval.suites:
        records = suite_records(cfg, suite, dataset, tokenizer)
        if not records:
            raise RunFolderError(f"eval suite '{suite.name}': no examples with a reference answer or held-out text "
                                 "(an empty test split? add data.test files or eval suite files)")
        if records[0].kind == "text":
            suites[suite.name] = _run_text_suite(cfg, records, systems, models, tokenizer)
            continue
        result, suite_rows = _run_suite(cfg, suite, records, systems, models, tokenizer, shots)
        suites[suite.name] = result
        rows += suite_rows
        prompts_generated += len(records) * len(systems)

    forgetting = _forgetting(cfg, systems, models, tokenizer) if cfg.eval.forgetting else None
    seconds = time.perf_counter() - started
    harness = run_harness(cfg, models, tokenizer, task_manager) if task_manager is not None else None
    metrics = manifest("eval", systems=[s.name for s in systems], suites=suites, forgetting=forgetting,
                       harness=harness, timing={"seconds": round(seconds, 2), "prompts_generated": prompts_generated,
                                                "device": device_name(precision.device), "host": socket.gethostname(),
                                                "placement": placement},
                       trained_sha256=trained_sha256)
    return metrics, rows


def record_eval(cfg: RunConfig, run: RunPaths, metrics: dict[str, Any], rows: list[dict[str, Any]],
                folder: Path | None = None) -> EvalResult:
    """The rest of an eval, where the run is recorded: the judge (its endpoint and key are this process's), the
    gate, and the report files in `folder` (default: the run's eval/), written whole or not at all."""
    systems = metrics["systems"]
    if cfg.eval.judge is not None:
        from tunelab.eval.judge import judge_rows

        metrics["judge"] = judge_rows(cfg.eval.judge, rows, systems)
    rules, metrics["gate_source"] = gate_rules(cfg.eval, cfg.objective.type)
    metrics["gate"], gate_error = gate_rows(rules, metrics)  # a rule naming an unmeasured number: raised below
    history = _read_metrics(run.metrics)
    with atomic_dir(folder or run.eval) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        write_jsonl_atomic(tmp / "predictions.jsonl", rows)
        write_text_atomic(tmp / "report.md", render_markdown(metrics, rows, run.root.name))
        write_text_atomic(tmp / "report.html", render_html(metrics, rows, history, run.root.name))
    problems = harness_problems(metrics.get("harness")) + (gate_error.problems if gate_error is not None else [])
    if problems:  # the measured numbers are written; what could not be read from them is said now
        raise ConfigError(*problems)
    return EvalResult(metrics=metrics, rows=rows)


def _run_suite(cfg: RunConfig, suite: SuiteConfig, records: list[Record], systems: list[System], models: Models,
               tokenizer: Any, shots: list[dict[str, str]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    conversations = [with_system_prompt(r.messages[:-1], cfg.data.system_prompt) for r in records]
    # Scored against the answer a reference gives, after any reasoning block its template would write before it.
    references = [answer_part(tokenizer, r.messages[-1]["content"]) for r in records]
    scorers = {m: resolve_metric(m, suite.regex, suite.json_schema) for m in suite.metrics if m not in ("bleu", "eval_loss")}
    outputs: dict[str, list[str]] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, dict[str, float]] = {}
    context = getattr(models.tuned.config.get_text_config(), "max_position_embeddings", None)
    for system in systems:
        shown = conversations
        if system.few_shot:
            shown, kept = _fitted_shots(tokenizer, conversations, shots, context, cfg.eval.max_new_tokens, suite.name)
        prompts = [render_prompt(tokenizer, c) for c in shown]
        with models.use(system) as net:
            outputs[system.name] = _answers(models, system, net, tokenizer, prompts, cfg.eval.max_new_tokens,
                                            cfg.eval.batch_size, label=f"{suite.name}: {system.name}")
            loss = None
            if "eval_loss" in suite.metrics:
                encoded = loss_examples(tokenizer, records, shown, shots if system.few_shot else [])
                loss = mean_token_loss(net, encoded, tokenizer.pad_token_id, cfg.eval.batch_size)
        scores[system.name] = {m: [fn(o, ref) for o, ref in zip(outputs[system.name], references)]
                               for m, fn in scorers.items()}
        summary[system.name] = {m: sum(v) / len(v) for m, v in scores[system.name].items()}
        if "bleu" in suite.metrics:
            summary[system.name]["bleu"] = corpus_bleu(outputs[system.name], references)
        if loss is not None:
            summary[system.name].update(eval_loss=loss, perplexity=perplexity(loss))
        summary[system.name]["mean_words"] = sum(len(o.split()) for o in outputs[system.name]) / len(records)
        if system.few_shot:
            summary[system.name]["mean_shots"] = sum(kept) / len(kept)
    primary = next(iter(scorers), None)
    rows = [
        {
            "suite": suite.name, "id": record.id, "prompt": conversations[i][-1]["content"],
            "reference": references[i],
            "outputs": {s.name: outputs[s.name][i] for s in systems},
            "scores": {s.name: {m: scores[s.name][m][i] for m in scorers} for s in systems},
            "primary_metric": primary,
        }
        for i, record in enumerate(records)
    ]
    return {"n_examples": len(records), "examples_sha256": _examples_sha256(conversations, references),
            "metrics": list(suite.metrics), "systems": summary}, rows


def _run_text_suite(cfg: RunConfig, records: list[Record], systems: list[System], models: Models,
                    tokenizer: Any) -> dict[str, Any]:
    """Held-out raw text: each system's mean loss per token and perplexity on it, tokenized as continued
    pre-training tokenizes (bos as the tokenizer adds it, eos after); nothing is generated, and few-shot
    examples have no meaning here."""
    texts = [r.text or "" for r in records]
    encoded = [text_ids(tokenizer, t) for t in texts]
    examples = [{"input_ids": ids[: cfg.data.max_length], "labels": ids[: cfg.data.max_length]} for ids in encoded]
    summary: dict[str, dict[str, float]] = {}
    for system in systems:
        if system.few_shot:
            continue
        with models.use(system) as net:
            loss = mean_token_loss(net, examples, tokenizer.pad_token_id, cfg.eval.batch_size)
        summary[system.name] = {"eval_loss": loss, "perplexity": perplexity(loss)}
    return {"n_examples": len(records), "examples_sha256": _examples_sha256([], texts), "metrics": ["eval_loss"],
            "systems": summary}


def _examples_sha256(conversations: list[list[dict[str, str]]], references: list[str]) -> str:
    """What was asked and expected, as a hash: `tunelab runs compare` warns when two runs' numbers come from
    different examples (other data, another --max-examples), where a difference says nothing about the models."""
    text = json.dumps([conversations, references], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _answers(models: Models, system: System, net: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
             batch_size: int, label: str) -> list[str]:
    """Greedy answers; the base model's (adapter off, zero- or few-shot) come from the cache when it has them."""
    def generate() -> list[str]:
        return generate_greedy(net, tokenizer, prompts, max_new_tokens, batch_size, label=label)

    fingerprint = embedding_fingerprint(net) if models.answer_cache is not None else None
    if system.adapter is not None or system.model is not None or fingerprint is None:
        return generate()
    folder, identity = models.answer_cache
    # The quantization is part of the model: an NF4 base (QLoRA) answers otherwise than the same base in float,
    # though its embeddings and first parameter are the same.
    quantized = getattr(getattr(net, "config", None), "quantization_config", None)
    key = {"base": identity, "embeddings": fingerprint, "device": str(next(net.parameters()).device),
           "dtype": str(next(net.parameters()).dtype), "quantization": repr(quantized),
           "prompts": sha256_text(json.dumps(prompts)),
           "max_new_tokens": max_new_tokens, "batch_size": batch_size,
           "stops": [sorted(stop_token_ids(tokenizer, net)), stop_texts(tokenizer)]}
    answers = cached_answers(folder, key, generate)
    return answers if len(answers) == len(prompts) else generate()


def loss_examples(tokenizer: Any, records: list[Record], shown: list[list[dict[str, Any]]],
                  shots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record's reference answer after the prompt its system was shown, encoded for the eval loss. The
    few-shot examples' answers are context (weight 0), not scored: the loss is on the reference answer as for
    base and tuned."""
    demos = {id(m) for m in shots}
    context = [[{**m, "weight": 0} if id(m) in demos and m["role"] == "assistant" else m for m in s] for s in shown]
    with_answers = [Record(r.id, r.source, "chat", [*c, r.messages[-1]]) for r, c in zip(records, context)]
    return encode_records(tokenizer, with_answers, None, max_length=10**9)[0]


def _fitted_shots(tokenizer: Any, conversations: list[list[dict[str, str]]], shots: list[dict[str, str]],
                  context: int | None, max_new_tokens: int, suite: str) -> tuple[list[Any], list[int]]:
    """Each question with the shots its prompt and answer leave room for in the model's context; says when some
    questions were shown fewer than all of them."""
    def fits(conversation: list[dict[str, str]]) -> bool:
        return context is None or len(token_ids(tokenizer, render_prompt(tokenizer, conversation))) + \
            max_new_tokens <= context

    fitted = [fit_shots(c, shots, fits) for c in conversations]
    kept = [n for _, n in fitted]
    wanted = sum(m["role"] == "user" for m in shots)
    short = sum(n < wanted for n in kept)
    if short:
        console.print(f"[yellow]warning:[/] eval suite '{suite}': {short} of {len(kept)} few-shot prompts would not "
                      f"fit the model's context of {context} tokens with all {wanted} examples and "
                      f"{max_new_tokens} new tokens; they were shown fewer ({sum(kept) / len(kept):.2f} on average)")
    return [c for c, _ in fitted], kept


def _forgetting(cfg: RunConfig, systems: list[System], models: Models, tokenizer: Any) -> dict[str, Any]:
    """Pass rates of base and tuned on the bundled probes, per category, and the drops between them."""
    chosen = [s for s in systems if s.name in ("base", "tuned")]
    prompts = [render_prompt(tokenizer, with_system_prompt([{"role": "user", "content": p.prompt}],
                                                           cfg.data.system_prompt)) for p in PROBES]
    out: dict[str, Any] = {"n_probes": len(PROBES), "outputs": {}}
    flags: dict[str, list[bool]] = {}
    # Probes are short: they go in batches of what an eval batch of suite rows may hold (short_prompt_batch).
    batch = short_prompt_batch(cfg.eval.batch_size, cfg.data.max_length, tokenizer, prompts, PROBE_NEW_TOKENS)
    for system in chosen:
        with models.use(system) as net:
            answers = _answers(models, system, net, tokenizer, prompts, PROBE_NEW_TOKENS, batch,
                               label=f"probes: {system.name}")
        passed = flags[system.name] = [p.passed(a) for p, a in zip(PROBES, answers)]
        rates = {c: _rate([ok for p, ok in zip(PROBES, passed) if p.category == c]) for c in CATEGORIES}
        out[system.name] = {**rates, "overall": _rate(passed)}
        out["outputs"][system.name] = answers
    if "base" in out and "tuned" in out:
        # From the pass counts, so a drop of 5 probes in 100 is 0.05 exactly (0.14 - 0.09 is 0.05000000000000002).
        def drop(category: str | None) -> float:
            lost = [b - t for p, b, t in zip(PROBES, flags["base"], flags["tuned"]) if category in (None, p.category)]
            return sum(lost) / len(lost) if lost else float("nan")

        out["drop"] = drop(None)
        for c in CATEGORIES:
            out[f"{c}_drop"] = drop(c)
    return out


PROBE_NEW_TOKENS = 48


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed run
            continue
    return rows
