"""Atomic writes land with the permissions a plain write would give, and leave nothing behind on failure."""

from __future__ import annotations

import os

import pytest

from tunelab.artifacts import atomic_dir, write_text_atomic


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
