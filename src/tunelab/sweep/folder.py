"""The sweep folder (output.dir): start a new sweep, refuse to clobber one, or pick a killed one up again.

Layout: sweep.json (the trial record), config.yaml (the base config as resolved), data/ (prepared once, shared
into every trial), one ordinary run folder per trial, and at the end sweep.html and best.yaml.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from tunelab.artifacts import write_text_atomic
from tunelab.config import RunConfig
from tunelab.config_file import dump_config
from tunelab.errors import ConfigError, RunFolderError
from tunelab.progress import console
from tunelab.redaction import redacted_config
from tunelab.run_replace import aside_of
from tunelab.sweep.plan import RUNTIME_KEYS, SweepPlan
from tunelab.sweep.state import STATE_FILE, SweepState, TrialRecord

SWEEP_FILES = (STATE_FILE, "config.yaml", "sweep.html", "best.yaml", "data", "ray")


def resumable_config(cfg: RunConfig, folder: Path) -> RunConfig:
    """For `--resume`: the config with the sweep section the sweep was started with (flags given then are part of
    it), so `tunelab sweep CONFIG --resume` needs nothing repeated. Flags given now apply on top of it: the
    objective, mode and constraints may change (the finished trials are ranked again), the trials may not."""
    state = SweepState.load(folder) if (folder / STATE_FILE).is_file() else None
    if state is None:
        return cfg
    cfg = cfg.model_copy(deep=True)
    stored = RunConfig.model_validate(state.config).sweep
    for name in RUNTIME_KEYS:  # scheduling settings follow this invocation
        setattr(stored, name, getattr(cfg.sweep, name))
    cfg.sweep = stored
    return cfg


def open_sweep(plan: SweepPlan, resume: bool, retry_failed: bool = False) -> SweepState:
    """The sweep record to run from: a new one, or (with `resume`) the folder's own, checked against the plan;
    `retry_failed` runs failed trials again too (like Ray Tune's restart_errored)."""
    root, cfg = plan.root, plan.cfg
    state_path = root / STATE_FILE
    replacing: list[str] = []  # with output.overwrite: what of an old sweep goes once the new data validated
    if state_path.is_file():
        if resume:
            return _resumed(plan, SweepState.load(root), retry_failed)
        old = SweepState.load(root)
        if not cfg.output.overwrite:
            done = sum(t.status in ("finished", "stopped", "failed") for t in old.trials)
            raise RunFolderError(f"output.dir: {root} already holds a sweep ({done} trials ended); pass --resume to "
                                 "finish it, or --set output.overwrite=true to start it over")
        replacing = [name for name in (*SWEEP_FILES, *(t.name for t in old.trials)) if name != "data"]
    elif resume:
        raise RunFolderError(f"--resume: {root} holds no sweep to resume (no {STATE_FILE}); run without --resume")
    elif (root / "config.yaml").is_file() or (root / "adapter").exists():
        raise RunFolderError(f"output.dir: {root} holds a run, not a sweep; choose another output.dir for the sweep")
    elif root.is_dir() and any(root.iterdir()) and not cfg.output.overwrite:
        raise RunFolderError(f"output.dir: {root} is not empty; choose a new folder for the sweep")
    # Nothing is written yet: start_sweep does, once the data has validated.
    trials = [TrialRecord(t.index, t.name, t.params) for t in plan.trials]
    state = SweepState(state_path, plan.spec(), _stored(cfg), trials)
    state.replacing = replacing
    return state


def start_sweep(plan: SweepPlan, state: SweepState) -> None:
    """Prepare the shared data folder (a bad row fails here, once, before any trial), then write the sweep's
    config.yaml and sweep.json. A new sweep whose data fails leaves no folder behind."""
    from tunelab.data.prepare import prepare_data

    new = not state.path.is_file() or bool(state.replacing)
    if any(t.status == "pending" for t in state.trials):
        try:
            prepare_data(plan.cfg, plan.root / "data")
        except BaseException:
            if not state.path.is_file() and plan.root.is_dir() and {p.name for p in plan.root.iterdir()} <= {"data"}:
                shutil.rmtree(plan.root)
            raise
    if state.replacing:  # output.overwrite: the old sweep moves aside only now, with the new data valid
        _keep_aside(plan.root, state.replacing)
        state.replacing = []
    if new:
        write_text_atomic(plan.root / "config.yaml", dump_config(plan.cfg))
    state.save()


def _stored(cfg: RunConfig) -> dict[str, Any]:
    """The config as sweep.json records it (and MLflow receives it): secrets redacted."""
    return redacted_config(cfg)


def _resumed(plan: SweepPlan, state: SweepState, retry_failed: bool) -> SweepState:
    stored, current = copy.deepcopy(state.config), _stored(plan.cfg)
    for part in (stored, current):
        part.pop("sweep", None)  # compared below through the trials it draws
        part.get("output", {}).pop("overwrite", None)
    changed = _differences(stored, current)
    if changed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:3])
        raise ConfigError(f"--resume: the config differs from the one this sweep started with ({shown}); resume with "
                          f"the same config, or start a new sweep in another output.dir")
    if [(t.name, t.params) for t in state.trials] != [(t.name, t.params) for t in plan.trials]:
        raise ConfigError("--resume: these flags draw other trials than sweep.json holds; --resume keeps the search "
                          "space (it may change --objective, --mode, --constraint); start a new sweep in another "
                          "output.dir to search another space")
    state.spec, state.config = plan.spec(), _stored(plan.cfg)  # a new objective or constraints rank the trials anew
    for record in state.trials:
        metrics = plan.root / record.name / "eval" / "metrics.json"
        if record.status in ("pending", "running") and metrics.is_file():
            record.status = "finished"  # it finished, but the sweep was killed before writing that down
        elif record.status == "running" or (retry_failed and record.status == "failed"):
            record.status, record.error = "pending", None  # cut short by the kill: it runs again from the start
    state.save()
    return state


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in dict.fromkeys([*a, *b]):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def kept_aside(root: Path) -> Path:
    """Where a sweep replaced with output.overwrite waits until its replacement has a finished trial."""
    return aside_of(root)


def _keep_aside(root: Path, names: list[str]) -> None:
    """output.overwrite on a sweep folder: the old sweep's own files and every trial folder it made move aside
    (its trials are trained runs). If an older sweep waits there already, the one being replaced now was its
    replacement: one with a finished trial replaces it there; one without goes, and the older sweep stays."""
    aside = kept_aside(root)
    if aside.is_dir():
        if not _has_finished_trial(SweepState.load(root)):
            _remove(root, names)
            return
        shutil.rmtree(aside)
    aside.mkdir()
    for name in names:
        if (root / name).exists() or (root / name).is_symlink():
            os.rename(root / name, aside / name)
    console.print(f"[yellow]note:[/] the sweep this one replaces is kept at {aside} until one of this sweep's "
                  "trials has finished")


def finish_replacement(root: Path, state: SweepState) -> None:
    """After a sweep ran: the sweep it replaced goes once one of its trials has finished."""
    aside = kept_aside(root)
    if aside.is_dir() and _has_finished_trial(state):
        shutil.rmtree(aside)
    elif aside.is_dir():
        console.print(f"[yellow]note:[/] no trial of this sweep finished: the sweep it replaces stays at {aside}")


def _has_finished_trial(state: SweepState) -> bool:
    return any(t.status == "finished" for t in state.trials)


def _remove(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def reset_trial_folder(root: Path, name: str) -> None:
    """An interrupted trial starts over in a clean folder (its partial run would otherwise refuse to train)."""
    shutil.rmtree(root / name, ignore_errors=True)
