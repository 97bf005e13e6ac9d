"""Nothing is lost: a run folder is replaced only after the new data validated and only with output.overwrite,
failed stages leave no orphan folders, output.dir may not be a folder whose loss would hurt, and exports refuse
an existing --out unless --overwrite. Every case goes through the real CLI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli_process import run_tunelab
from tests.conftest import animal_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return run_tunelab(*args, cwd=cwd, env=env)


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def config_file(tmp_path: Path, model_dir: Path, train: Path, out: str | Path, **extra: object) -> Path:
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir(exist_ok=True)
    raw = {"model": {"name": str(model_dir)}, "data": {"train": str(train)}, "output": {"dir": str(out)}, **extra}
    path.write_text(yaml.safe_dump(raw))
    return path


def trained_run(folder: Path) -> Path:
    """A folder that looks like a trained run: an adapter and the config it was trained with."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "config.yaml").write_text("# the config this run was trained with\n")
    return folder


@pytest.fixture
def good_rows(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", animal_rows(30))


@pytest.fixture
def bad_rows(tmp_path: Path) -> Path:
    rows = animal_rows(30)
    rows[7]["messages"][1]["role"] = "bot"
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_overwrite_with_invalid_data_keeps_the_trained_run(tmp_path, tiny_model_dir, bad_rows):
    run = trained_run(tmp_path / "run")
    path = config_file(tmp_path, tiny_model_dir, bad_rows, run)
    result = run_cli("train", str(path), "--set", "output.overwrite=true")
    assert "unknown role 'bot'" in one_error(result)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (run / "config.yaml").read_text() == "# the config this run was trained with\n"


def test_overwrite_replaces_the_run_once_the_new_data_validated(tmp_path, tiny_model_dir, good_rows):
    run = trained_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text("{}\n")
    path = config_file(tmp_path, tiny_model_dir, good_rows, run)
    result = run_cli("data", "prep", str(path), "--set", "output.overwrite=true")
    assert result.returncode == 0, result.stderr
    # The new run has its data, its config and the stamp of its own MLflow run; the old one waits aside, whole,
    # until a new run has trained: data prep alone replaces no trained run.
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data", "mlflow_run.json"]
    assert yaml.safe_load((run / "config.yaml").read_text())["output"]["overwrite"] is True
    aside = tmp_path / ".run.replaced"
    assert f"keptat{aside}until" in "".join(result.stderr.split())  # the note says where (rich wraps lines)
    assert (aside / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in aside.iterdir()) == ["adapter", "config.yaml", "metrics.jsonl"]
    # Training next (the overwrite was asked for already) trains the replacement; then the old run goes.
    result = run_cli("train", str(path), "--set", "train.max_steps=2")
    assert result.returncode == 0, result.stderr
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != b"weights"
    assert not aside.exists()


@pytest.mark.parametrize("objective,message", [
    ({"type": "dpo"}, "objective.type: dpo trains on preference rows, but {train} holds chat rows"),
    ({"type": "grpo", "rewards": ["exact_mtch"]}, "objective.rewards: unknown reward 'exact_mtch'"),
    ({"type": "grpo", "rewards": ["regex"], "reward_regex": "([a"},
     "objective.reward_regex: '([a' is not a valid regular expression"),
])
def test_an_objective_that_cannot_train_on_this_data_is_refused_before_the_old_run_goes(
        tmp_path, tiny_model_dir, good_rows, objective, message):
    run = trained_run(tmp_path / "run")
    path = config_file(tmp_path, tiny_model_dir, good_rows, run, objective=objective)
    expected = message.format(train=good_rows)
    assert expected in one_error(run_cli("run", str(path), "--dry-run"))  # the dry run says so too
    assert expected in one_error(run_cli("train", str(path), "--set", "output.overwrite=true"))
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml"]


def test_data_prep_never_rewrites_a_trained_runs_config(tmp_path, tiny_model_dir, good_rows):
    run = trained_run(tmp_path / "run")
    path = config_file(tmp_path, tiny_model_dir, good_rows, run)
    error = one_error(run_cli("data", "prep", str(path)))
    assert f"output.dir: {run} already holds a trained run" in error and "output.overwrite=true" in error
    assert (run / "config.yaml").read_text() == "# the config this run was trained with\n"
    assert not (run / "data").exists()


def test_failed_data_prep_leaves_no_run_folder(tmp_path, tiny_model_dir, bad_rows):
    run = tmp_path / "runs" / "team" / "new"
    path = config_file(tmp_path, tiny_model_dir, bad_rows, run)
    assert "unknown role 'bot'" in one_error(run_cli("data", "prep", str(path)))
    assert not (tmp_path / "runs").exists()  # nor the parent folders made for it
    (tmp_path / "runs").mkdir()  # a folder that was there before stays, even empty
    assert "unknown role 'bot'" in one_error(run_cli("train", str(path)))
    assert not run.exists() and not run.parent.exists() and (tmp_path / "runs").is_dir()


def test_inputs_inside_the_run_folder_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, good_rows):
    run = tmp_path / "proj"
    (run / "data").mkdir(parents=True)
    inside_data = write_jsonl(run / "data" / "train.jsonl", animal_rows(30))  # data prep would replace it by a split
    before = inside_data.read_bytes()
    path = config_file(tmp_path, tiny_model_dir, inside_data, run)
    for command in (["data", "prep"], ["run", "--dry-run"]):
        error = one_error(run_cli(*command, str(path)))
        assert f"data.train[0]: {inside_data} lies inside output.dir {run}" in error, error
    assert inside_data.read_bytes() == before and sorted(p.name for p in run.rglob("*")) == ["data", "train.jsonl"]
    # In the run folder's root: output.overwrite would delete it with the old run.
    trained_run(run / "old")
    beside = write_jsonl(run / "old" / "raw.jsonl", animal_rows(30))
    path = config_file(tmp_path, tiny_model_dir, good_rows, run / "old",
                       eval={"suites": [{"name": "x", "files": [str(beside)]}]})
    error = one_error(run_cli("data", "prep", str(path), "--set", "output.overwrite=true"))
    assert f"eval.suites[0].files[0]: {beside} lies inside output.dir" in error, error
    assert beside.is_file() and (run / "old" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("command", [("data", "prep"), ("train",)])
def test_no_rows_left_keeps_the_dataset_a_trained_run_was_made_from(tmp_path, tiny_model_dir, good_rows, command):
    run = tmp_path / "run"
    assert run_cli("data", "prep", str(config_file(tmp_path, tiny_model_dir, good_rows, run))).returncode == 0
    trained_run_files = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    rows = animal_rows(30)
    for row in rows:
        row["messages"][1]["role"] = "bot"
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", rows)
    path = tmp_path / "cfg" / "skip.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "output": {"dir": str(run)},
                                    "data": {"train": str(all_bad), "on_error": "skip"}}))
    error = one_error(run_cli(*command, str(path), "--set", "output.overwrite=true"))
    assert "no training examples left" in error and f"see {run / 'data-rejected' / 'report.md'}" in error, error
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == trained_run_files
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    # The report the error names is there, beside the old run put back in place (the new one kept it).
    assert "unknown role 'bot'" in (run / "data-rejected" / "report.md").read_text()
    assert not (tmp_path / ".run.replaced").exists()


@pytest.mark.parametrize("out", [".", "/", "~/", "..", "HOME", "CONFIG_DIR", "CONFIG_PARENT"])
def test_output_dir_that_would_replace_a_precious_folder_is_refused(tmp_path, tiny_model_dir, good_rows, out):
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    path = config_file(tmp_path, tiny_model_dir, good_rows, "PLACEHOLDER")
    value = {"HOME": str(Path.home()), "CONFIG_DIR": str(path.parent), "CONFIG_PARENT": str(tmp_path)}.get(out, out)
    path.write_text(path.read_text().replace("PLACEHOLDER", value))
    line = path.read_text().splitlines().index("output:") + 2
    error = one_error(run_cli("run", str(path), "--dry-run", cwd=cwd))
    assert error.startswith(f"error: {path}:{line}: output.dir: {Path(value)} is "), error
    assert "a run needs a folder of its own" in error
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_exports_refuse_an_existing_out_unless_overwrite(tmp_path, tiny_model_dir, good_rows):
    run = tmp_path / "run"
    path = config_file(tmp_path, tiny_model_dir, good_rows, run)
    assert run_cli("data", "prep", str(path)).returncode == 0
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("do not delete")
    for command in (["merge"], ["gguf", "--quant", "f16"], ["int4"]):
        error = one_error(run_cli("export", *command, str(run), "--out", str(keep)))
        assert error == f"error: --out: {keep} already exists and is not empty; choose a new folder or pass " \
                        "--overwrite to replace it"
        error = one_error(run_cli("export", *command, str(run), "--out", str(run.parent), "--overwrite"))
        assert error == f"error: --out: {run.parent} holds the run folder {run}; choose a new folder"
        error = one_error(run_cli("export", *command, str(run), "--out", str(run / "data" / "x"), "--overwrite"))
        assert f"--out: {run / 'data' / 'x'} is inside the run's own data/ folder" in error
    # Under a file (it failed after the whole merge), and the base model's own folder (the next merge would fold
    # the adapter in twice): refused before any work.
    error = one_error(run_cli("export", "merge", str(run), "--out", str(keep / "precious.txt" / "x")))
    assert error == f"error: --out: {keep / 'precious.txt' / 'x'} is under {keep / 'precious.txt'}, which is a file; " \
                    "choose a new folder"
    error = one_error(run_cli("export", "merge", str(run), "--out", str(tiny_model_dir), "--overwrite"))
    assert error == f"error: --out: {tiny_model_dir} holds the base model {tiny_model_dir} the run was trained on; " \
                    "choose a new folder"
    assert (keep / "precious.txt").read_text() == "do not delete"
