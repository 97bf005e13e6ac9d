"""Who may import whom: the layers stay a stack, with no import circles through the modules below.

Read from the source with ast, function-level imports included: a circle hidden inside a function still
ties two layers together (and fails at import time once someone hoists the import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunelab

PACKAGE = Path(tunelab.__file__).parent

# Modules that once took part in an import circle, and the layers' meeting points. (Circles not yet untied:
# config <-> eval.gate, serve.engine <-> serve.continuous/static_batch, serve.api <-> serve.guard.)
WATCHED = ["tunelab.pipeline", "tunelab.track", "tunelab.registry", "tunelab.cluster.ray_runner", "tunelab.cli",
           "tunelab.cli_ship", "tunelab.cli_common", "tunelab.eval.run", "tunelab.eval.reward_accuracy",
           "tunelab.eval.result", "tunelab.eval.terminal_chat", "tunelab.losses", "tunelab.config_file",
           "tunelab.artifacts", "tunelab.train.sft", "tunelab.serve.server", "tunelab.serve.adapters"]
# Only the commands and sweep trials (which run whole runs) sit above the orchestrator.
MAY_IMPORT_PIPELINE = ("tunelab.__main__", "tunelab.cli", "tunelab.cli_ship", "tunelab.cli_sweep", "tunelab.sweep.")


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from tunelab import pipeline` imports the module tunelab.pipeline, not a name of tunelab
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {m for m in found if m in known and m not in (name, "tunelab")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_function_level_imports(graph):
    # sweep/trial.py imports pipeline inside a function only; a reader that missed those would pass anything
    assert "tunelab.pipeline" in graph["tunelab.sweep.trial"]
    assert "tunelab.cli_ship" in graph["tunelab.cli"]


@pytest.mark.parametrize("module", WATCHED)
def test_no_import_circle_runs_through(graph, module):
    back = sorted(m for m in _reachable(graph, module) if module in _reachable(graph, m))
    assert module in graph and not back, f"{module} imports {back}, which import it back"


def test_only_the_commands_and_sweeps_import_the_orchestrator(graph):
    importers = sorted(m for m, deps in graph.items() if "tunelab.pipeline" in deps)
    assert importers and [m for m in importers if not m.startswith(MAY_IMPORT_PIPELINE)] == []


def test_train_and_eval_do_not_import_each_other(graph):
    train_to_eval = {d for m, deps in graph.items() if m.startswith("tunelab.train.") for d in deps
                     if d.startswith("tunelab.eval")}
    # GRPO's exact_match reward scores answers as eval does; that module is a leaf, so no circle forms
    assert train_to_eval <= {"tunelab.eval.metrics"}
    assert not any(m.startswith("tunelab.train") for m in _reachable(graph, "tunelab.eval.metrics"))
    assert not any(d.startswith("tunelab.eval") for d in graph["tunelab.losses"])


def test_serve_finds_trained_folders_without_eval(graph):
    assert [(m, d) for m, deps in graph.items() if m.startswith("tunelab.serve") for d in deps
            if d.startswith("tunelab.eval")] == []
