"""output.overwrite on a trained run: the old run stays until the new one has trained.

Training (or data prep) that starts over in a folder holding a trained run first moves the old run aside whole
(one rename, to a hidden folder beside it) and builds the new run in its place. Once the new run has its weights
and its manifest, the old run goes. If the new run stops before that:
- with nothing to resume from (bad data, an error before the first checkpoint), its folder goes and the old run
  is renamed back, as if nothing had happened (a data report saying why the data failed comes along);
- with a checkpoint, both stay: `--resume` continues the new run (the old one goes when it finishes), and
  training again with output.overwrite puts the old run back first, then starts over.
Data prep on its own stops before training, so the old run stays aside: the next training into the folder trains
the replacement (with or without output.overwrite: it was asked for already), and the old run goes once it has.
A process killed outright leaves both folders; the next training into the folder settles them the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tunelab.artifacts import RunPaths
from tunelab.errors import RunFolderError
from tunelab.progress import console


def kept_aside(run: RunPaths) -> Path:
    """Where the run being replaced waits while its replacement trains."""
    return aside_of(run.root)


def aside_of(folder: Path) -> Path:
    """Where output.overwrite keeps what `folder` held until its replacement is valid: beside the real folder
    (output.dir may be a link to it), so that moving it is one rename on one file system."""
    real = folder.resolve()
    return real.with_name(f".{real.name}.replaced")


def finished_training(run: RunPaths) -> bool:
    """The run's weights are saved and its manifest records the training (written last, after the weights)."""
    if not run.is_trained or not run.manifest.is_file():
        return False
    try:
        return "train" in json.loads(run.manifest.read_text())
    except (OSError, ValueError):
        return False


def settle_interrupted_replacement(run: RunPaths, resume: bool, overwrite: bool) -> None:
    """Before training into `run`: finish or undo a replacement that an earlier process did not end."""
    aside = kept_aside(run)
    if not aside.is_dir():
        return
    if finished_training(run):  # the new run trained; only removing the old one was cut short
        shutil.rmtree(aside)
        return
    if resume:  # continue the new run; the old one stays aside until it has trained
        return
    if not _has_checkpoint(run):  # nothing of the new run to lose or resume: train it, the old one waits aside
        console.print(f"[yellow]note:[/] the trained run this one replaces is kept at {aside} until this one has "
                      "trained")
        return
    if not overwrite:
        raise RunFolderError(f"output.dir: {run.root} holds an unfinished run that replaces the run kept at {aside}; "
                             "pass --resume to continue it, or --set output.overwrite=true to start it over")
    _put_back(run, aside)


@contextlib.contextmanager
def replacing_trained_run(run: RunPaths, resume: bool, overwrite: bool) -> Iterator[None]:
    """Around a training into `run`: move a trained run it replaces aside first, remove that old run once the new
    one has trained, and put it back if the new one stops with nothing to resume from."""
    aside = kept_aside(run)
    # Not when a run is aside already: this folder then holds its unfinished replacement (settled as it opened).
    if overwrite and not resume and run.holds_training and not aside.is_dir():
        _move_aside(run, aside)
    if not aside.is_dir():
        yield
        return
    try:
        yield
    except BaseException:
        if _has_checkpoint(run):
            console.print(f"[yellow]note:[/] the run this one replaces is kept at {aside} until this one finishes; "
                          f"--resume continues this run, output.overwrite starts it over with the old run put back")
        else:
            _put_back(run, aside)
        raise
    if finished_training(run):
        shutil.rmtree(aside)


def _move_aside(run: RunPaths, aside: Path) -> None:
    """The old run to `aside` in one rename; its Dataset linked back, so unchanged data is reused, not rebuilt."""
    settle_interrupted_replacement(run, resume=False, overwrite=True)  # normally done as the run folder opened
    real = run.root.resolve()
    try:
        os.rename(real, aside)
    except OSError as err:  # e.g. a parent folder this user may not write to
        raise RunFolderError(f"output.dir: {run.root} holds a trained run, which output.overwrite keeps at {aside} "
                             f"until the new run has trained, but it cannot be moved there ({err.strerror}); "
                             "choose another output.dir") from None
    real.mkdir()
    if (aside / run.data.name).is_dir():
        # Hard links cost no space; data prep never writes into an existing Dataset folder, it replaces it whole.
        shutil.copytree(aside / run.data.name, run.data, copy_function=_link_or_copy)


def _has_checkpoint(run: RunPaths) -> bool:
    return run.has_checkpoint


def _put_back(run: RunPaths, aside: Path) -> None:
    """The old run back in its place. The report of data that failed to validate (which the error names) stays."""
    real = run.root.resolve()
    rejected = real / f"{run.data.name}-rejected"
    if rejected.is_dir():
        shutil.rmtree(aside / rejected.name, ignore_errors=True)
        os.rename(rejected, aside / rejected.name)
    shutil.rmtree(real, ignore_errors=True)
    os.rename(aside, real)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)
