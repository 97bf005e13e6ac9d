"""Config: seeds' defaults, overrides, and error messages that name the key, line and fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli_process import run_tunelab
from tunelab.config_file import dump_config, load_config, validate_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_defaults_are_the_seeds_recommendations():
    cfg = validate_config({"data": {"train": "a.jsonl"}})
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (16, 32, 0.05)
    assert cfg.method.target_modules == "all-linear"
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.lr_scheduler == "cosine"
    assert cfg.train.warmup_ratio == 0.03
    assert cfg.train.gradient_accumulation_steps == 1
    assert cfg.model.name == "smollm2-135m-instruct"


def test_single_path_becomes_a_list():
    cfg = validate_config({"data": {"train": "a.jsonl", "test": ["b.jsonl", "c.jsonl"]}})
    assert [s.path for s in cfg.data.train] == [Path("a.jsonl")]
    assert [s.path for s in cfg.data.test] == [Path("b.jsonl"), Path("c.jsonl")]
    assert cfg.data.train[0].weight == 1.0 and cfg.data.train[0].format is None


def test_misspelled_key_names_path_line_and_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrain:\n  learning_rat: 1.0e-4\n")
    assert problems(path) == [f"{path}:4: unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?"]


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\nlearning_rate: 0.1\n")
    assert problems(path) == [f"{path}:3: unknown key 'learning_rate'; did you mean 'train.learning_rate'?"]


def test_keys_of_an_optional_section_are_named_in_full(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\neval:\n  harness:\n    tasks: [mmlu]\n    limt: 5\n"
                           "  judge:\n    base_url: http://x\n    model: m\n    rubrik: x\n")
    assert problems(path) == [f"{path}:6: unknown key 'eval.harness.limt'; did you mean 'eval.harness.limit'?",
                              f"{path}:10: unknown key 'eval.judge.rubrik'; did you mean 'eval.judge.rubric'?"]
    assert problems(path, ["eval.harness={tasks: [mmlu], limit: many}", "eval.judge=null"])[0].endswith(
        "'eval.harness.limit' expects an integer or a number (or null), got 'many'")
    assert validate_config({"data": {"train": "a.jsonl"}, "eval": {"harness": ["mmlu", "hellaswag"]}}).eval.harness.tasks \
        == ["mmlu", "hellaswag"]


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrain:\n  batch_size: lots\n  lr_scheduler: wavy\n")
    assert problems(path) == [
        f"{path}:4: 'train.batch_size' expects an integer, got 'lots'",
        f"{path}:5: 'train.lr_scheduler' expects one of: cosine, linear, constant, constant_with_warmup, got 'wavy'",
    ]


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrian: {}\nmethod:\n  r: -1\n  alpah: 3\n")
    found = problems(path)
    assert len(found) == 3
    assert any("'method.r': input should be greater than 0" in p for p in found)
    assert any("did you mean 'method.alpha'" in p for p in found)
    assert any("did you mean 'train'" in p for p in found)


def test_missing_training_data_is_named(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n")
    assert problems(path) == [f"{path}: 'data' is required but missing"]


def test_set_overrides_parse_values_and_win(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrain:\n  learning_rate: 1.0e-3\n")
    cfg = load_config(path, ["train.learning_rate=1e-4", "train.gradient_checkpointing=true", "method.r=8"])
    assert cfg.train.learning_rate == 1e-4
    assert cfg.train.gradient_checkpointing is True
    assert cfg.method.r == 8


def test_bad_set_override_is_attributed_to_set(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\n")
    assert problems(path, ["train.epoch=2"]) == [
        f"{path} (--set train.epoch): unknown key 'train.epoch'; did you mean 'train.epochs'?"
    ]
    assert problems(path, ["nonsense"]) == ["--set 'nonsense': expected KEY.PATH=VALUE, e.g. train.learning_rate=1e-4"]
    # An empty name between dots was looked up as a key of the file and blamed on a line of it.
    for bad in ("train..epochs=2", ".epochs=2", "train.=2"):
        key = bad.partition("=")[0]
        assert problems(path, [bad]) == [f"--set {key}: a key path has a name between each dot, e.g. train.epochs=2"]
    assert load_config(path, [" train . epochs = 3"]).train.epochs == 3


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  train: [a.jsonl\nmethod:\n  r: 4\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:") and "invalid YAML" in problem


def test_resolved_config_round_trips(tmp_path):
    cfg = validate_config({"data": {"train": "a.jsonl"}, "train": {"epochs": 3}})
    again = validate_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("**/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_every_shipped_example_config_parses(path):
    from tunelab.eval.gate import check_syntax

    cfg = load_config(path)
    for source in [*cfg.data.train, *cfg.data.test]:
        assert (ROOT / source.path).is_file(), source.path
    for rule in cfg.eval.gate or []:
        check_syntax(rule)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return run_tunelab(*args, cwd=cwd, env=env)


def test_cli_config_error_is_one_line_per_problem_and_no_traceback(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrain:\n  learning_rat: 1\n  epochs: many\n")
    result = run_cli("run", str(path), "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {path}:4: unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?",
        f"error: {path}:5: 'train.epochs' expects a number, got 'many'",
    ]


@pytest.mark.parametrize("runs,message", [
    (["runs/base"], "a run folder named 'base' would be taken for the base system"),
    (["runs/tuned"], "a run folder named 'tuned' would be taken for the tuned system"),
    (["a/x", "b/x"], "two run folders are named 'x'"),
])
def test_compared_runs_need_system_names_of_their_own(runs, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"data": {"train": "a.jsonl"}, "eval": {"compare_runs": runs}})
