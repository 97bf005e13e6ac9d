"""Standard benchmarks as a forgetting measure: lm-evaluation-harness tasks scored on base and tuned.

The model is loaded once. lm-eval's HFLM wraps that loaded model object (not a path, so nothing is loaded
again): "base" is scored with the adapter switched off (PEFT's disable_adapter), "tuned" with it on, through
the same `Models.use` switch the suites use. Task names are resolved and their documents loaded before any
model is, so a task that cannot run (an unknown name, a hub-hosted dataset without network) stops the eval,
or the run before training, with one line saying which and what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from tunelab.config import RunConfig
from tunelab.config_harness import HarnessConfig
from tunelab.errors import ConfigError
from tunelab.eval.systems import Models, System
from tunelab.progress import console

# The number compared per task when eval.harness.metric does not say: length-normalized accuracy where the task
# reports it (hellaswag, arc: the figure usually published), else accuracy (mmlu), else exact match (gsm8k).
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match")
OFFLINE_HINT = ("hub-hosted tasks need network access (or their dataset already in the Hugging Face datasets cache, "
                "HF_DATASETS_CACHE); offline, write a task YAML over a local JSONL (dataset_path: json) and name its "
                "folder in eval.harness.include_path")


def check_harness(cfg: RunConfig) -> Any:
    """`check_tasks` for a run's eval.harness, which a reward model (a scorer, not a language model) cannot take."""
    assert cfg.eval.harness is not None
    if cfg.objective.type == "reward":
        raise ConfigError("eval.harness: a reward model scores answers and does not model language; remove eval.harness")
    return check_tasks(cfg.eval.harness)


def check_tasks(harness: HarnessConfig) -> Any:
    """Resolve every task name and load its documents; returns lm-eval's TaskManager for `run_harness`.

    Raises ConfigError with one line per task that cannot run. Loading is the check: a hub-hosted task
    downloads (or reads from the datasets cache) here, so what cannot be reached fails before any weights load.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("eval.harness needs lm-evaluation-harness: pip install lm-eval==0.4.13") from None
    missing = [str(p) for p in harness.include_path if not p.exists()]
    if missing:
        raise ConfigError(*(f"eval.harness.include_path: {p} does not exist" for p in missing))
    manager = _task_manager(TaskManager, harness)
    problems = []
    with _quiet_lm_eval():
        for name in harness.tasks:
            entry = manager.task_index.get(name)
            if entry is None:
                close = difflib.get_close_matches(name, manager.all_tasks, n=1, cutoff=0.8)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append(f"eval.harness.tasks: no lm-eval task or group is named '{name}' (built-in or in "
                                f"eval.harness.include_path); {hint}list them with `lm-eval ls tasks`, or define it "
                                "in a task YAML in a folder named by eval.harness.include_path")
            elif name in manager.all_tags:
                problems.append(f"eval.harness.tasks: '{name}' is a tag (a list of tasks with no score of its own); "
                                "name its tasks or a group instead")
            else:
                try:
                    manager.load([name])
                except Exception as err:  # noqa: BLE001 - any failure here is about the task the user named
                    problems.append(_load_problem(name, err))
    if problems:
        raise ConfigError(*problems)
    return manager


def _task_manager(task_manager: Any, harness: HarnessConfig) -> Any:
    """Only the include_path tasks when they define every named task: indexing lm-eval's ~15,000 built-in
    entries takes seconds that a local task does not need."""
    paths = [str(p) for p in harness.include_path]
    if paths:
        local = task_manager(include_path=paths, include_defaults=False)
        if all(name in local.task_index for name in harness.tasks):
            return local
    return task_manager(include_path=paths or None)


def _load_problem(name: str, err: Exception) -> str:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    reason = lines[0][:200]
    chain, cause = [err], err.__cause__ or err.__context__
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, ConnectionError) or type(e).__module__.startswith("huggingface_hub") for e in chain):
        return f"eval.harness.tasks: '{name}' cannot load its dataset ({reason}): {OFFLINE_HINT}"
    return f"eval.harness.tasks: '{name}' cannot be loaded: {reason}"


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns that a loaded model (not a path) was passed in, which tunelab does on purpose, and that a
    num_fewshot the user chose overrides the task's; keep its warnings about the tasks themselves."""
    noisy = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.evaluator")]
    before = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(noisy, before):
            log.setLevel(level)


def run_harness(cfg: RunConfig, models: Models, tokenizer: Any, manager: Any) -> dict[str, Any]:
    """Score every eval.harness task on base (adapter off) and tuned; the numbers metrics.json holds."""
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate

    harness = cfg.eval.harness
    assert harness is not None
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for system in (System("base"), System("tuned", adapter="default")):
        console.print(f"[bold]harness[/]: {system.name} on {', '.join(harness.tasks)}")
        with models.use(system) as net, _quiet_lm_eval(), ending_turns(net, tokenizer):
            results[system.name] = simple_evaluate(
                _wrap(net, tokenizer, harness.batch_size or cfg.eval.batch_size),
                tasks=list(harness.tasks), task_manager=manager, num_fewshot=harness.num_fewshot,
                limit=harness.limit, log_samples=False, apply_chat_template=harness.apply_chat_template,
                system_instruction=cfg.data.system_prompt if harness.apply_chat_template else None,
            )
    tasks = {name: _task_scores(name, results["base"], results["tuned"], harness.metric.get(name))
             for name in harness.tasks}
    return {"tasks": tasks, "limit": harness.limit, "num_fewshot": harness.num_fewshot,
            "apply_chat_template": harness.apply_chat_template, "lm_eval_version": lm_eval_version,
            "seconds": round(time.perf_counter() - started, 2)}


@contextlib.contextmanager
def ending_turns(net: Any, tokenizer: Any) -> Iterator[None]:
    """lm-eval's generation stops at the model's generation-config eos ids and at stop texts, which it matches in
    text decoded without special tokens: a template's end-of-turn token that is neither (a base model given a
    template) would never stop an answer. It is added to the eos ids while the harness runs."""
    from tunelab.families import stop_token_ids

    config = net.generation_config
    before = config.eos_token_id
    config.eos_token_id = stop_token_ids(tokenizer, net)
    try:
        yield
    finally:
        config.eos_token_id = before


def _wrap(net: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HF model around the already-loaded network: it keeps the object, loads nothing, moves nothing."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size)


def _task_scores(name: str, base: dict[str, Any], tuned: dict[str, Any], wanted: str | None) -> dict[str, Any]:
    numbers = {system: _numbers(result["results"].get(name, {})) for system, result in
               (("base", base), ("tuned", tuned))}
    key = _pick(numbers["base"], wanted)
    if key is None or key not in numbers["tuned"]:
        asked = f"eval.harness.metric: task '{name}' reports no '{wanted}'" if wanted else \
            f"eval.harness.tasks: task '{name}' reported no score"
        return {"metric": wanted, "error": f"{asked} (it reports {', '.join(numbers['base']) or 'nothing'})",
                "numbers": numbers}
    metric = key.split(",")[0]
    higher_is_better = bool(base.get("higher_is_better", {}).get(name, {}).get(metric, True))
    b, t = numbers["base"][key], numbers["tuned"][key]
    out = {"metric": key, "higher_is_better": higher_is_better, "base": b, "tuned": t,
           # drop: how much ground tuning lost, whichever way the number points (forgetting.drop's sign)
           "drop": (b - t) if higher_is_better else (t - b), "n": _documents(name, base)}
    for system, result in (("base", base), ("tuned", tuned)):
        stderr = result["results"][name].get(f"{metric}_stderr,{key.split(',', 1)[1]}")
        if isinstance(stderr, (int, float)) and math.isfinite(stderr):
            out[f"{system}_stderr"] = float(stderr)
    return {**out, "numbers": numbers}


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """A task's scores as lm-eval keys them, 'metric,filter' -> value, without standard errors."""
    return {k: float(v) for k, v in row.items() if "," in k and "_stderr," not in k
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _pick(numbers: dict[str, float], wanted: str | None) -> str | None:
    if wanted is not None:
        if wanted in numbers:
            return wanted
        filtered = [k for k in numbers if k.split(",")[0] == wanted]
        return f"{wanted},none" if f"{wanted},none" in filtered else (filtered[0] if filtered else None)
    for metric in PREFERRED_METRICS:
        keys = [k for k in numbers if k.split(",")[0] == metric]
        if keys:
            return f"{metric},none" if f"{metric},none" in keys else keys[0]
    return next(iter(numbers), None)


def _documents(name: str, result: dict[str, Any]) -> int:
    """Documents scored for a task, or for every task under a group."""
    samples = result.get("n-samples", {})
    if name in samples:
        return int(samples[name]["effective"])
    return sum(_documents(child, result) for child in result.get("group_subtasks", {}).get(name, []))


def harness_problems(harness: dict[str, Any] | None) -> list[str]:
    """Tasks whose number could not be read: a metric choice the task does not report, or no score at all."""
    return [t["error"] for t in (harness or {}).get("tasks", {}).values() if "error" in t]
