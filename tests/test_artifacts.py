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
    assert not run.holds_training  # made as training starts: a run killed before its first checkpoint holds nothing
    (run.checkpoints / ".staging" / "checkpoint-4").mkdir(parents=True)
    assert not run.holds_training  # a save cut short is not a checkpoint either
    (run.checkpoints / "checkpoint-4").mkdir()
    assert run.holds_training and not run.holds_trained_folder  # an interrupted run: no weights yet
    run.model.mkdir()
    assert run.holds_trained_folder and run.kind is None  # a folder without config.json loads nothing
    (run.model / "config.json").write_text("{}")
    assert (run.kind, run.is_trained, run.trained) == ("full", True, run.model)
    run.adapter.mkdir()
    run.adapter_config.write_text("{}")
    assert (run.kind, run.trained, run.has_full_model) == ("adapter", run.adapter, True)  # the adapter wins


def test_replacing_a_folder_never_leaves_it_missing(tmp_path):
    """A reader (serving, eval, a registry download) must never find a run's folder gone while a newer one is
    put in its place: the swap is one atomic exchange, and the old content goes afterwards."""
    import threading

    from tunelab.artifacts import exchange

    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("0")
    missing, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (final / "weights").is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for i in range(1, 100):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text(str(i))
    stop.set()
    watcher.join()
    assert missing == [] and (final / "weights").read_text() == "99"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or old folder left
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("A"), (b / "x").write_text("B")
    assert exchange(a, b) and ((a / "x").read_text(), (b / "x").read_text()) == ("B", "A")


def test_run_manifest_is_strict_json(tmp_path):
    """A val loss with no val split is NaN in Python; the manifest says null (browsers' JSON.parse refuses NaN)."""
    import json

    from tunelab.pipeline import update_run_manifest

    run = RunPaths(tmp_path / "run")
    write_text_atomic(run.config, "data: {train: a.jsonl}\n")
    update_run_manifest(run, train={"val_loss": float("nan"), "last_loss": 0.5, "curve": [float("nan"), 1.0]})
    text = run.manifest.read_text()
    assert "NaN" not in text
    assert json.loads(text)["train"] == {"val_loss": None, "last_loss": 0.5, "curve": [None, 1.0]}


WRITER = """
import sys, time
from pathlib import Path
from tunelab.artifacts import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "weights.bin").write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(600)
"""


def _start_writer(final):
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    return writer


def test_a_writer_killed_outright_leaves_nothing_the_next_writer_keeps(tmp_path):
    import signal

    final = tmp_path / "merged"
    killed = _start_writer(final)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [left] = tmp_path.iterdir()
    assert f".{killed.pid}." in left.name and (left / "weights.bin").is_file()  # a kill cleans nothing up
    live = _start_writer(final)  # the next export of the same folder: the dead writer's folder goes
    try:
        [temp] = tmp_path.iterdir()
        assert f".{live.pid}." in temp.name
        with atomic_dir(final) as tmp:  # and another, while that one is still writing
            (tmp / "weights.bin").write_bytes(b"new")
        left = sorted(p.name for p in tmp_path.iterdir())
        # The dead writer's half-written folder is gone; the live writer's is untouched.
        assert left[0] != "merged" and f".{live.pid}." in left[0] and left[1:] == ["merged"]
        assert (final / "weights.bin").read_bytes() == b"new"
    finally:
        live.kill()
        live.wait()


def test_content_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    """Where there is no atomic exchange, a swap is two renames: a writer killed between them left the previous
    content aside and the folder missing. The next writer puts it back before doing anything else."""
    import subprocess
    import sys

    final = tmp_path / "merged"
    aside = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from tunelab.artifacts import _writer; f = Path(sys.argv[1]); "
                            "o = f.with_name(_writer(f) + 'old'); o.mkdir(); (o / 'w').write_text('previous'); "
                            "print(o)", str(final)], capture_output=True, text=True, check=True).stdout.strip()
    assert not final.exists() and os.path.isdir(aside)
    with pytest.raises(RuntimeError):
        with atomic_dir(final):
            raise RuntimeError("the new export fails")
    assert (final / "w").read_text() == "previous" and not os.path.exists(aside)
