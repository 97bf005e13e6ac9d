"""`tunelab runs`: list tracked runs, and compare two run folders' metrics and configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import RunFolderError
from tunelab.track import GATE_PASSED_TAG, flatten, mlflow_client, store_errors


def list_runs(uri: str, experiment: str) -> list[dict[str, str]]:
    with store_errors("runs list", uri):
        client = mlflow_client(uri, existing=True)
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"]) if found else []
    rows = []
    for run in runs:
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        exact_key = next((k for k in m if k.endswith(".tuned.exact_match")), None)
        exact = "" if exact_key is None else f"{m[exact_key]:.1%}"
        counted = exact_key and m.get(exact_key.removesuffix("tuned.exact_match") + "n_examples")
        if counted:
            exact += f" of {int(counted)}"
        rows.append({"name": run.info.run_name or run.info.run_id, "status": run.info.status,
                     "method": p.get("method.type", t.get("tunelab.method", "")),
                     "objective": p.get("objective.type", t.get("tunelab.objective", "")),
                     "loss": f"{m['loss']:.4f}" if "loss" in m else "",
                     "exact_match": exact,
                     "gate": "off" if t.get("tunelab.gate") == "[]" else
                     {"true": "pass", "false": "FAIL"}.get(t.get(GATE_PASSED_TAG, ""), "")})
    return rows


def _numbers(run_dir: Path) -> dict[str, Any]:
    manifest_path, eval_path = run_dir / "manifest.json", run_dir / "eval" / "metrics.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    elif eval_path.is_file():  # a registered version's local copy: its eval, not the training run's manifest
        evaluated = json.loads(eval_path.read_text())
        manifest = {"eval": {name: suite["systems"] for name, suite in (evaluated.get("suites") or {}).items()}}
    else:
        raise RunFolderError(f"{run_dir}: not a run folder (no manifest.json)")
    numbers = {f"train.{k}": v for k, v in (manifest.get("train") or {}).items() if isinstance(v, (int, float))}
    for suite, systems in (manifest.get("eval") or {}).items():
        for system, values in systems.items():
            numbers.update({f"{suite}.{system}.{k}": v for k, v in values.items()})
    forgetting = manifest.get("forgetting") or {}
    numbers.update({f"forgetting.{k}": v for k, v in forgetting.items() if isinstance(v, (int, float))})
    for task, scores in (manifest.get("harness") or {}).items():
        numbers.update({f"harness.{task}.{k}": scores[k] for k in ("base", "tuned", "drop") if k in scores})
    return {k: float(v) for k, v in numbers.items() if not isinstance(v, bool)}


def _evaluated_on(run_dir: Path) -> dict[str, tuple[int, str | None]]:
    """Per suite (and the forgetting probes): how many examples the run's eval scored, and their hash."""
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    found = {name: (suite["n_examples"], suite.get("examples_sha256"))
             for name, suite in (metrics.get("suites") or {}).items()}
    if metrics.get("forgetting"):
        found["forgetting probes"] = (metrics["forgetting"]["n_probes"], None)
    return found


def _eval_mismatches(run_a: Path, run_b: Path) -> list[str]:
    """Why some of two runs' metrics are not comparable: a suite scored on different examples or counts."""
    a, b = _evaluated_on(run_a), _evaluated_on(run_b)
    warnings = []
    for suite in sorted(set(a) & set(b)):
        (n_a, hash_a), (n_b, hash_b) = a[suite], b[suite]
        if n_a != n_b:
            warnings.append(f"{suite}: {run_a.name} was evaluated on {n_a} examples and {run_b.name} on {n_b}; "
                            "their numbers are not comparable")
        elif hash_a and hash_b and hash_a != hash_b:
            warnings.append(f"{suite}: {run_a.name} and {run_b.name} were evaluated on different examples "
                            f"({n_a} each); their numbers are not comparable")
    return warnings


def compare(run_a: Path, run_b: Path) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]], list[str]]:
    """Metric rows, differing config keys, and warnings about metrics measured on different examples."""
    a, b = _numbers(run_a), _numbers(run_b)
    metrics = [(k, a.get(k, ""), b.get(k, "")) for k in sorted(set(a) | set(b))]
    config_a = flatten(yaml.safe_load((run_a / "config.yaml").read_text()))
    config_b = flatten(yaml.safe_load((run_b / "config.yaml").read_text()))
    config = [(k, config_a.get(k, ""), config_b.get(k, "")) for k in sorted(set(config_a) | set(config_b))
              if config_a.get(k) != config_b.get(k)]
    return metrics, config, _eval_mismatches(run_a, run_b)
