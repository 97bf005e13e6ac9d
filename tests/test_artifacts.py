"""Atomic writes land with the permissions a plain write would give, and leave nothing behind on failure."""

from __future__ import annotations

import os

import pytest

from tunelab.artifacts import RunPaths, atomic_dir, write_text_atomic


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask_002):
    write_text_atomic(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o775
    assert os.umask(0o002) == 0o002  # the umask itself is left as it was


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "b.txt", 42)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_run_paths_tell_what_training_left(tmp_path):
    run = RunPaths(tmp_path / "run")
    assert (run.kind, run.is_trained, run.holds_trained_folder, run.holds_training) == (None, False, False, False)
    assert run.trained_for("full") == run.model and run.trained_for("lora") == run.adapter
    run.checkpoints.mkdir(parents=True)
    assert run.holds_training and not run.holds_trained_folder  # an interrupted run: no weights yet
    run.model.mkdir()
    assert run.holds_trained_folder and run.kind is None  # a folder without config.json loads nothing
    (run.model / "config.json").write_text("{}")
    assert (run.kind, run.is_trained, run.trained) == ("full", True, run.model)
    run.adapter.mkdir()
    run.adapter_config.write_text("{}")
    assert (run.kind, run.trained, run.has_full_model) == ("adapter", run.adapter, True)  # the adapter wins
