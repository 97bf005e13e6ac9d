"""The sweep's driver: hand the pending trials to Ray Tune (with ASHA when early stopping is on) and keep
sweep.json current as each one starts, reports, and ends.

Tune runs a fixed list: the trials drawn in tunelab.sweep.space, passed by index through a grid search, so
Tune's search algorithm adds nothing and a resumed sweep hands Tune exactly the trials still to run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tunelab.errors import TunelabError
from tunelab.progress import console, progress_bar
from tunelab.sweep.folder import reset_trial_folder
from tunelab.sweep.goals import measure
from tunelab.sweep.plan import SweepPlan
from tunelab.sweep.state import DONE, SweepState
from tunelab.sweep.tracking import end_child
from tunelab.sweep.trial import error_summary, run_trial


def run_pending(plan: SweepPlan, state: SweepState) -> None:
    """Run every trial of `state` still pending, on the Ray cluster the config names (or a local one)."""
    from tunelab.cluster.ray_runner import connect_ray

    pending = [t for t in state.trials if t.status == "pending"]
    if not pending:
        return
    for record in pending:
        trial = plan.trials[record.index]
        end_child(trial.config, plan.root / record.name, "KILLED", "interrupted; run again")
        reset_trial_folder(plan.root, record.name)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as for a Ray training run: a cluster of our own
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables would interleave with ours
    started_here = connect_ray(plan.cfg, log_to_driver=False)
    # Tune logs each failed trial's traceback and a closing "Trials did not complete" error; the sweep says the
    # same in one line per trial, and the traceback is in the trial's folder (trial_error.txt).
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    try:
        _fit(plan, state, [t.index for t in pending])
    finally:
        if started_here:
            import ray

            ray.shutdown()
    if plan.cfg.cluster.storage_path is None:
        shutil.rmtree(plan.root / "ray", ignore_errors=True)  # Tune's own bookkeeping: sweep.json is the record
    for record in state.trials:  # Tune was stopped (Ctrl-C) with trials under way: they start over on --resume
        if record.status == "running":
            record.status = "pending"
    state.save()


def _fit(plan: SweepPlan, state: SweepState, indexes: list[int]) -> None:
    import ray
    from ray import tune

    s = plan.cfg.sweep
    gpus = s.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    payload = {
        "cwd": os.getcwd(),
        "data": str((plan.root / "data").resolve()),
        "parent_run_id": state.parent_run_id,
        "trials": {t.index: {"name": t.name, "params": t.params, "config": json.loads(t.config.model_dump_json())}
                   for t in plan.trials if t.index in indexes},
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload),
                                    {"cpu": s.cpus_per_trial, "gpu": gpus})
    scheduler = None
    if plan.early_stopping:
        from ray.tune.schedulers import ASHAScheduler

        longest = max((t.config.train.max_steps or 0) for t in plan.trials)
        scheduler = ASHAScheduler(
            time_attr="step", metric="val_loss", mode="min", grace_period=plan.grace_steps,
            max_t=max(longest, plan.grace_steps or 1) if longest else 10**9, reduction_factor=s.reduction_factor,
            stop_last_trials=False)  # a trial that reached its last step is evaluated, not cut off
    callback = _Record(plan, state)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(indexes)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=s.max_concurrent,
                                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=_storage(plan),
                                  callbacks=[callback], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    where = plan.cfg.cluster.ray_address or "a local Ray cluster"
    console.print(f"Ray Tune on {where}: {len(indexes)} trials, {s.cpus_per_trial:g} CPU"
                  f"{f' + {gpus:g} GPU' if gpus else ''} each, at most {s.max_concurrent or 'as many as fit'} at once"
                  f"{f', ASHA early stopping on val loss from step {plan.grace_steps}' if plan.early_stopping else ''}")
    with callback.bar:
        tuner.fit()


def _storage(plan: SweepPlan) -> str:
    """Where Tune keeps its results: cluster.storage_path (a folder every node shares, or s3://...), else a
    folder in the sweep, removed when the sweep ends."""
    path = plan.cfg.cluster.storage_path
    if path is None:
        return str((plan.root / "ray").resolve())
    return path if "://" in path else str(Path(path).resolve())


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.config['trial']:03d}"


class _Record(Callback):
    """Tune callback in the driver: every trial event goes into sweep.json at once, and onto the terminal."""

    def __init__(self, plan: SweepPlan, state: SweepState) -> None:
        self.plan, self.state = plan, state
        self.bar = progress_bar()
        done = sum(t.status in DONE for t in state.trials)
        self.task = self.bar.add_task("sweep", total=len(state.trials), completed=done, info="")

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into its own experiment state (for Tuner.restore, which a sweep does not use:
        # sweep.json is its record); the live bar and the state stay in this process.
        return {}

    def _record(self, trial: Any) -> Any:
        return self.state.trial(trial.config["trial"])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._record(trial)
        record.status, record.started_unix, record.ended_unix = "running", time.time(), None
        record.attempts += 1
        self.state.save()
        self.bar.update(self.task, info=f"started {record.name}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        record = self._record(trial)
        if result.get("evaluated"):  # the trial's last word: trained and evaluated
            record.step, record.val_loss = int(result["steps"]), _finite(result.get("val_loss"))
        elif "step" in result and "val_loss" in result:
            record.step, record.val_loss = int(result["step"]), _finite(result["val_loss"])
            self.state.save()
            self.bar.update(self.task, info=f"{record.name}: step {record.step} val loss {record.val_loss or 0:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._record(trial)
        metrics = self.plan.root / record.name / "eval" / "metrics.json"
        record.ended_unix = time.time()
        if metrics.is_file():
            try:
                outcome = measure(json.loads(metrics.read_text()), self.plan.objective, self.plan.constraints)
            except (TunelabError, OSError, ValueError) as err:
                record.status, record.error = "failed", f"its metrics cannot be read: {err}"
                self.state.save()
                self.bar.update(self.task, advance=1)
                return
            record.status, record.objective = "finished", outcome.objective
            record.constraints, record.feasible = outcome.rules, outcome.feasible
            verdict = "" if not record.constraints else (" [green]meets the constraints[/]" if record.feasible
                                                         else " [red]breaks a constraint[/]")
            shown = "not measured" if record.objective is None else f"{record.objective:.4g}"
            console.print(f"[green]finished[/] {record.name}: {self.plan.objective} = {shown}{verdict}")
        else:
            record.status = "stopped"
            end_child(self.plan.trials[record.index].config, self.plan.root / record.name, "KILLED",
                      f"stopped by ASHA at step {record.step}")
            console.print(f"[yellow]stopped[/] {record.name} by ASHA at step {record.step} "
                          f"(val loss {record.val_loss if record.val_loss is not None else float('nan'):.4f})")
        self.state.save()
        self.bar.update(self.task, advance=1)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._record(trial)
        record.status, record.ended_unix = "failed", time.time()
        record.error = error_summary(self.plan.root / record.name) or _ray_error(trial)
        end_child(self.plan.trials[record.index].config, self.plan.root / record.name, "FAILED", record.error)
        self.state.save()
        console.print(f"[red]failed[/] {record.name}: {record.error}")
        self.bar.update(self.task, advance=1)


def _ray_error(trial: Any) -> str:
    """A failure the trial could not write down itself (its worker died: out of memory, a lost node)."""
    path = trial.error_file or ""
    if path and Path(path).is_file():
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "the Ray worker failed (see Ray's logs)"


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
