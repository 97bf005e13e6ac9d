"""`tunelab runs compare` warns when two runs' metrics were measured on different examples."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.runs import compare


def run_folder(root: Path, name: str, n: int, examples_sha256: str, probes: int = 100) -> Path:
    folder = root / name
    (folder / "eval").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"output:\n  dir: {folder}\n")
    suite = {"n_examples": n, "examples_sha256": examples_sha256, "systems": {"tuned": {"exact_match": 0.5}}}
    metrics = {"suites": {"test": suite}, "forgetting": {"n_probes": probes}}
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (folder / "manifest.json").write_text(json.dumps({"eval": {"test": suite["systems"]}}))
    return folder


def test_same_examples_compare_quietly(tmp_path):
    a, b = run_folder(tmp_path, "a", 60, "h1"), run_folder(tmp_path, "b", 60, "h1")
    metrics, _, mismatches = compare(a, b)
    assert ("test.tuned.exact_match", 0.5, 0.5) in metrics and mismatches == []


def test_other_examples_of_the_same_count_are_named(tmp_path):
    a, b = run_folder(tmp_path, "a", 60, "h1"), run_folder(tmp_path, "b", 60, "h2", probes=50)
    _, _, mismatches = compare(a, b)
    assert mismatches == [
        "forgetting probes: a was evaluated on 100 examples and b on 50; their numbers are not comparable",
        "test: a and b were evaluated on different examples (60 each); their numbers are not comparable"]
