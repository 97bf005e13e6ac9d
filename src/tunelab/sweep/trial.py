"""One sweep trial, as a Ray Tune function trainable: an ordinary `tunelab run` (prepare -> train -> eval) into the
trial's own run folder, reporting each val loss to Tune as it is measured (what ASHA compares trials on).

This runs in a Ray worker process, not in the sweep's driver; it writes only into its own run folder. The driver
keeps sweep.json.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.config import RunConfig

ERROR_FILE = "trial_error.txt"
LOG_FILE = "trial.log"  # what the trial printed (progress, warnings): the sweep's terminal shows one line per trial


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (Python's and C libraries') into the trial's run folder while it runs;
    the worker's own streams come back afterwards (Tune may reuse the worker for the next trial)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Tune's entry point. `config["trial"]` is the trial's index; `payload` (shipped once through Ray's object
    store, never written to Tune's result files, so secrets in a config stay off disk) holds every trial's config,
    the driver's working folder, the shared data folder and the parent MLflow run."""
    from ray import tune

    from tunelab import pipeline
    from tunelab.sweep.tracking import start_child

    spec = payload["trials"][config["trial"]]
    if os.path.isdir(payload["cwd"]):
        os.chdir(payload["cwd"])  # relative paths in the config (data files) mean what they meant to the driver
    cfg = RunConfig.model_validate(spec["config"])
    run = RunPaths(Path(cfg.output.dir))
    run.root.mkdir(parents=True, exist_ok=True)
    with _output_to(run.root / LOG_FILE):
        try:
            _share_data(Path(payload["data"]), run)
            if cfg.track.enabled and payload["parent_run_id"]:
                start_child(cfg, run, payload["parent_run_id"], spec["params"])
            run = pipeline.open_run(cfg, starting_training=True)
            result = pipeline.stage_train(cfg, run, on_metrics=_reporter(tune.report))
            pipeline.stage_eval(cfg, run)
        except (SystemExit, KeyboardInterrupt):  # Tune stopping this worker (ASHA, the sweep ending): not an error
            raise
        except BaseException as err:
            _record_error(run, err)
            raise
    # No "step" here: the scheduler judges trials on val loss measured while training (its time axis is "step"),
    # and a trial that has trained and been evaluated is done whatever it would decide. Tune wants the scheduler's
    # metric in every result, so the final val loss goes in under its name.
    tune.report({"val_loss": result.val_loss, "steps": result.steps, "evaluated": 1})


def _reporter(report: Any) -> Any:
    def on_row(row: dict[str, Any]) -> None:
        if "eval_loss" in row:  # the Trainer's val loss every train.eval_steps steps
            report({"step": int(row["step"]), "val_loss": float(row["eval_loss"])})

    return on_row


def _share_data(shared: Path, run: RunPaths) -> None:
    """The sweep's data folder, prepared once by the driver, hard-linked into the trial (files are only ever
    replaced, never edited in place, so links are safe). The data stage reuses it when the trial's data config
    is the sweep's, and prepares its own when a swept key changes the data."""
    if not (shared / "manifest.json").is_file() or run.data.exists():
        return

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(shared, run.data, copy_function=link)


def _record_error(run: RunPaths, err: BaseException) -> None:
    """What went wrong, in the trial's folder: one line first (what the driver shows), then the traceback."""
    from tunelab.errors import TunelabError

    from tunelab.redaction import redact_message

    # The first line goes into sweep.json and an MLflow tag: any endpoint it quotes loses its credentials, any
    # key an endpoint echoed is removed.
    summary = "; ".join(err.problems) if isinstance(err, TunelabError) else f"{type(err).__name__}: {err}"
    summary = redact_message(summary)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        text = redact_message("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        (run.root / ERROR_FILE).write_text(f"{summary.splitlines()[0] if summary else type(err).__name__}\n\n{text}",
                                           encoding="utf-8")
    except OSError:
        pass


def error_summary(run_dir: Path) -> str | None:
    """The first line of a failed trial's error file, if it wrote one."""
    path = run_dir / ERROR_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").split("\n", 1)[0].strip() or None
