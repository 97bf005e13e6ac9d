"""Evaluation of a reward-model run: how often it ranks the chosen answer above the rejected one."""

from __future__ import annotations

from pathlib import Path

from tunelab.artifacts import (
    RunPaths,
    atomic_dir,
    manifest,
    write_json_atomic,
    write_text_atomic,
)
from tunelab.config import RunConfig
from tunelab.data.prepare import load_dataset
from tunelab.errors import RunFolderError
from tunelab.eval.gate import gate_rules
from tunelab.eval.result import EvalResult, gate_rows
from tunelab.models import load_tokenizer


def evaluate_reward_run(cfg: RunConfig, run: RunPaths, folder: Path) -> EvalResult:
    from tunelab.train.reward_model import load_reward_model, pairwise_accuracy

    test = load_dataset(run.data).test
    if not test:
        raise RunFolderError(f"{run.data}: the test split is empty; add data.test files or raise data.test_fraction")
    accuracy = pairwise_accuracy(load_reward_model(run.root), load_tokenizer(run.adapter), test)
    suites = {"test": {"n_examples": len(test), "metrics": ["pairwise_accuracy"],
                       "systems": {"tuned": {"pairwise_accuracy": accuracy}}}}
    metrics = manifest("eval", systems=["tuned"], suites=suites, forgetting=None, timing={})
    rules, metrics["gate_source"] = gate_rules(cfg.eval, cfg.objective.type)
    metrics["gate"], gate_error = gate_rows(rules, metrics)  # a rule naming an unmeasured number: raised below
    with atomic_dir(folder) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        write_text_atomic(tmp / "report.md", f"# Reward model: {run.root.name}\n\nPairwise accuracy on "
                          f"{len(test)} held-out pairs: {accuracy:.1%}\n")
    if gate_error is not None:  # the measured accuracy is written; what could not be read from it is said now
        raise gate_error
    return EvalResult(metrics=metrics, rows=[])
