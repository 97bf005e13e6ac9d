"""Stage orchestration: run folder set-up, pre-flight checks, and prepare -> train -> eval.

Every stage is a plain function of (config, run folder); the CLI, tests and (later) cluster workers all
call these same functions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import (
    RunPaths,
    manifest,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from tunelab.config import TRL_OBJECTIVES, RunConfig
from tunelab.config_file import dump_config
from tunelab.data.prepare import Prepared, build_dataset, prepare_data
from tunelab.errors import RunFolderError, TunelabError
from tunelab.model_facts import model_facts
from tunelab.models import ModelSource, locate_model, pick_precision
from tunelab.preflight import check_compatibility, training_device
from tunelab.progress import console
from tunelab.run_checks import check_inputs_outside, check_resumable, same_data
from tunelab.run_replace import kept_aside, replacing_trained_run, settle_interrupted_replacement
from tunelab.train.oom import advice_on_out_of_memory


def open_run(cfg: RunConfig, starting_training: bool, resume: bool = False) -> RunPaths:
    """Check that output.dir may take this run, and write the resolved config into a folder that holds no
    trained run.

    Nothing is deleted here: a folder that already holds a trained run is kept as it is until the new data
    has validated (stage_data), and replaced only with output.overwrite; training keeps it aside until the new run
    has trained (run_replace). Its config.yaml is never rewritten before that, so `data prep` on a trained run
    cannot make its config disagree with its adapter.
    """
    run = RunPaths(cfg.output.dir)
    check_inputs_outside(cfg, run)
    if starting_training:
        settle_interrupted_replacement(run, resume, cfg.output.overwrite)
    trained = run.holds_training
    if starting_training and not resume and trained and not cfg.output.overwrite:
        raise _already_trained(run)
    if starting_training and resume:
        check_resumable(cfg, run)
    if (not trained or resume) and not run.config.exists():
        write_text_atomic(run.config, dump_config(cfg))  # a new run folder; stage_data rewrites it once data validated
    return run


@contextlib.contextmanager
def opened_run(cfg: RunConfig, starting_training: bool, resume: bool = False) -> Iterator[RunPaths]:
    """`open_run` for a stage. If the stage fails before writing anything (the run folder holds nothing but its
    config.yaml, or nothing at all), the folder goes again, and so do the parent folders opening it created
    while they are empty: a failed stage must not leave an empty-looking run behind. Folders that were there
    before are left alone."""
    created = _missing_folders(Path(cfg.output.dir).parent)  # deepest first
    run = open_run(cfg, starting_training, resume)
    try:
        yield run
    except BaseException:
        if run.root.is_dir() and {p.name for p in run.root.iterdir()} <= {run.config.name}:
            run.config.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run.root.rmdir()
                for folder in created:
                    folder.rmdir()  # not empty (another run's folder appeared there): stop
        raise


def _missing_folders(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def preflight(cfg: RunConfig, resume: bool = False) -> list[str]:
    """Every check that needs no model weights: data rows, model source, device, output folder (which may hold
    the run to continue with `resume`).

    Returns human-readable lines describing what was checked; raises a TunelabError on the first failure.
    """
    from tunelab.track import check_store_uri

    source = check_before_training(cfg)
    run = RunPaths(cfg.output.dir)
    check_inputs_outside(cfg, run)
    check_store_uri(cfg)
    prepared = build_dataset(cfg, generate_replay=False)
    dataset = prepared.dataset
    if run.holds_training and not cfg.output.overwrite and not resume:
        raise _already_trained(run)
    counts = dataset.counts()
    harness = []
    if cfg.eval.harness is not None:
        from tunelab.eval.harness import check_harness

        check_harness(cfg)
        harness = [f"benchmarks (eval.harness): {', '.join(cfg.eval.harness.tasks)} found, their documents loaded"]
    skipped = prepared.report["skipped"]["count"]
    validity = f"{skipped} bad rows skipped (data.on_error: skip; listed in the data report)" if skipped else \
        "all rows valid"
    return [
        f"data: {counts['train']} train / {counts['val']} val / {counts['test']} test examples, {validity}",
        *_replay_line(prepared.report.get("replay") or {}),
        f"model: {source.name} ({source.kind}: {source.path})",
        *model_facts(cfg).lines(cfg.data.max_length),
        f"precision: {_precision(cfg)}",
        f"training: {_training_place(cfg)}",
        f"eval after training (tunelab run): {_eval_place(cfg)}",
        *(["warning: cluster.strategy fsdp shards the model across GPUs to train it; the eval loads it whole, in "
           "float32, on one worker's GPU"] if cfg.cluster.evaluates_on_worker() and cfg.cluster.strategy == "fsdp"
          else []),
        _gate_line(cfg),
        *([f"register (tunelab run): as {cfg.track.register_as}, gate verdict included"] if cfg.track.register_as
          else []),
        f"output: {run.root}",
        *harness,
    ]


def check_before_training(cfg: RunConfig) -> ModelSource:
    """What the train stage checks before anything else, against the device that trains (on a KubeRay head pod,
    which has no GPU, that is the GPU workers' device). Returns the model's source."""
    source = locate_model(cfg.model)
    check_compatibility(cfg, training_device(cfg), source)
    if cfg.cluster.backend == "ray":  # a cluster that cannot run this must not wait for data prep to say so
        from tunelab.cluster.ray_runner import check_cluster

        check_cluster(cfg)
    if cfg.objective.type == "grpo":  # a misspelt reward must not wait for the data and the weights
        from tunelab.train.grpo_rewards import check_rewards

        check_rewards(cfg.objective)
    return source


def _precision(cfg: RunConfig) -> str:
    if cfg.cluster.backend == "ray" and cfg.cluster.use_gpu:
        return f"chosen by each Ray GPU worker on its own GPU from model.dtype: {cfg.model.dtype}"
    return pick_precision(cfg.model).label


def _replay_line(replay: dict[str, Any]) -> list[str]:
    if not replay.get("wanted"):
        return []
    if "self_answers" in replay:
        return [f"replay: {replay['wanted']} rows wanted (ratio {replay['ratio']}); self answers {replay['self_answers']}"]
    return [f"replay: {replay['rows']} of the train examples are replay rows (ratio {replay['ratio']}, "
            f"sources {replay.get('sources', {})})"]


def _gate_line(cfg: RunConfig) -> str:
    from tunelab.eval.gate import gate_rules

    rules, source = gate_rules(cfg.eval, cfg.objective.type)
    if not rules:
        return "gate: none (eval.gate: [])" if source == "config" else "gate: none measurable by this eval"
    return f"gate ({source}): " + "; ".join(rules)


def _training_place(cfg: RunConfig) -> str:
    c = cfg.cluster
    if c.backend == "local":
        return "this process"
    where = c.ray_address or "a local Ray cluster started for the run"
    return f"{c.num_workers} Ray {'GPU' if c.use_gpu else 'CPU'} workers ({c.strategy}) on {where}"


def _eval_place(cfg: RunConfig) -> str:
    if not cfg.cluster.evaluates_on_worker():
        return "this process"
    c = cfg.cluster
    return (f"a Ray worker ({c.worker_resources()}; cluster.eval_on: {c.eval_on}; waits up to {c.eval_wait_s:g} s "
            "for one to be free)")


def stage_data(cfg: RunConfig, run: RunPaths, resume: bool = False, end_tracking: bool = False) -> Prepared:
    """Prepare the Dataset folder (reused as is when sources and data config are unchanged), and log the config,
    the Dataset and its report to the run's MLflow run; `end_tracking` ends that run (data prep on its own).

    In a folder that holds a trained run, the data it trained on stays unless output.overwrite is set (and
    nothing is logged: that run's config and data are in MLflow already); with it, the old run moves aside
    (run_replace) until a new run has trained here, and data that fails to validate puts it back."""
    prepared, tracker = _prepare_and_log(cfg, run, resume)
    if tracker is not None and end_tracking:
        tracker.finish()
    return prepared


def _prepare_and_log(cfg: RunConfig, run: RunPaths, resume: bool) -> tuple[Prepared, Any]:
    """stage_data, returning also the tracker it logged with (None: nothing logged), for training to go on with."""
    from tunelab.track import check_store_uri

    check_store_uri(cfg)  # the tracker starts once the data is valid; a URI it cannot use is said before
    trained = run.holds_training and not resume
    if trained and not cfg.output.overwrite and not same_data(cfg, run):
        raise RunFolderError(f"output.dir: {run.root} already holds a trained run made from other data; choose "
                             "another output.dir or pass --set output.overwrite=true to replace it")
    if trained and cfg.output.overwrite:  # data prep on its own: the old run waits aside for a new one to train
        with replacing_trained_run(run, resume=False, overwrite=True):
            prepared = prepare_data(cfg, run.data)
        console.print(f"[yellow]note:[/] the trained run this data replaces is kept at {kept_aside(run)} until a "
                      "new run has trained here")
    else:
        prepared = prepare_data(cfg, run.data)
        if trained:
            return prepared, None
    write_text_atomic(run.config, dump_config(cfg))
    # Only now, with the data valid: the tracker's run-id stamp must not keep a failed run folder alive.
    tracker = tracker_for(cfg, run)
    if tracker is not None:
        tracker.log_config()
        tracker.log_data(run.data)
    return prepared, tracker


def _already_trained(run: RunPaths) -> RunFolderError:
    return RunFolderError(f"output.dir: {run.root} already holds a trained run; choose another output.dir or pass "
                          "--set output.overwrite=true to replace it")


def tracker_for(cfg: RunConfig, run: RunPaths) -> Any:
    """The MLflow tracker of this run folder, or None when tracking is off."""
    if not cfg.track.enabled:
        return None
    from tunelab.track import Tracker

    return Tracker(cfg, run)


def stage_train(cfg: RunConfig, run: RunPaths, resume: bool = False,
                on_metrics: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Train into `run`; every metrics row (loss, val loss) also goes to MLflow and to `on_metrics` (a sweep
    trial's reporter), as it is written."""
    from tunelab.models import model_record

    source = check_before_training(cfg)
    base = model_record(cfg.model, source)  # before training: a Hub commit as resolved for this run
    with replacing_trained_run(run, resume, cfg.output.overwrite):
        return _train_and_log(cfg, run, base, resume, on_metrics)


def _train_and_log(cfg: RunConfig, run: RunPaths, base: dict[str, Any], resume: bool,
                   on_metrics: Callable[[dict[str, Any]], None] | None) -> Any:
    from tunelab.train.preference import train_preference
    from tunelab.train.sft import train_sft

    prepared, tracker = _prepare_and_log(cfg, run, resume)
    dataset = prepared.dataset
    if tracker is None:
        tracker = tracker_for(cfg, run)
    if tracker is not None:
        tracker.mark_running()
    trainer = train_preference if cfg.objective.type in TRL_OBJECTIVES else train_sft
    if cfg.cluster.backend == "ray":
        from tunelab.cluster.ray_runner import train_on_ray

        trainer = train_on_ray
    monitor = tracker.system_metrics() if tracker is not None else None
    try:
        with advice_on_out_of_memory(cfg, run):
            result = trainer(cfg, run, dataset, resume=resume, on_metrics=_both(tracker, on_metrics))
    except BaseException as err:
        if tracker is not None:  # stopped from outside (Ctrl-C; a sweep's scheduler ending the trial) is not a failure
            tracker.finish("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    finally:
        if monitor is not None:
            tracker.stop_system_metrics(monitor)
    update_run_manifest(run, model=base, data=dataset.counts(), train=result.to_json())
    if tracker is not None:
        tracker.log_metrics({"step": result.steps, "train_seconds": result.train_seconds,
                             "train_tokens_per_second": result.tokens_per_second,
                             "peak_memory_mb": result.peak_memory_mb, "trainable_params": result.trainable_params})
        tracker.log_trained()
        tracker.finish()
    return result


def _both(tracker: Any, sink: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None] | None:
    sinks = [s for s in (tracker.log_metrics if tracker is not None else None, sink) if s is not None]
    if len(sinks) < 2:
        return sinks[0] if sinks else None

    def both(row: dict[str, Any]) -> None:
        for s in sinks:
            s(row)

    return both


def stage_eval(cfg: RunConfig, run: RunPaths, sample: bool = False, after_training: bool = False) -> Any:
    """Evaluate the run: its eval/ report, manifest and MLflow run hold the result (the evidence a registry
    version is promoted on). A `sample` (`tunelab eval --max-examples N`, a quick look) goes to eval-sample/ and
    nowhere else: a score on a handful of examples must not replace the run's evidence. `after_training`: the
    eval that follows training in `tunelab run`, placed by cluster.eval_on (a Ray worker's GPU)."""
    from tunelab.eval.run import evaluate_run

    if sample:
        return evaluate_run(cfg, run, run.eval_sample)
    if after_training and cfg.cluster.evaluates_on_worker():
        from tunelab.cluster.ray_eval import evaluate_on_worker

        result = evaluate_on_worker(cfg, run)
    else:
        result = evaluate_run(cfg, run)
    suites = result.metrics["suites"]
    update_run_manifest(run, eval={name: suite["systems"] for name, suite in suites.items()},
                        forgetting=_forgetting_summary(result.metrics.get("forgetting")),
                        harness=_harness_summary(result.metrics.get("harness")),
                        gate=result.metrics.get("gate", []), gate_passed=result.gate_passed)
    tracker = tracker_for(cfg, run)
    if tracker is not None:
        tracker.log_eval(result.metrics)
        tracker.finish()
    return result


def log_export(cfg: RunConfig, run: RunPaths, folder: Path, report: Path) -> None:
    """An export's verification report to the MLflow run of the run it exported, when that run was tracked
    (an export never starts an MLflow run of its own)."""
    from tunelab.track import RUN_ID_FILE

    if cfg.track.enabled and (run.root / RUN_ID_FILE).is_file():
        tracker_for(cfg, run).log_export(folder, report)


def _forgetting_summary(forgetting: dict[str, Any] | None) -> dict[str, Any] | None:
    if not forgetting:
        return None
    return {k: v for k, v in forgetting.items() if k != "outputs"}


def _harness_summary(harness: dict[str, Any] | None) -> dict[str, Any] | None:
    if not harness:
        return None
    return {task: {k: v for k, v in scores.items() if k != "numbers"} for task, scores in harness["tasks"].items()}


@dataclass
class RunSummary:
    run: RunPaths
    train: Any
    eval: Any
    registered: Any = None  # the model version track.register_as made (MLflow's ModelVersion), and whether new
    new_version: bool = False
    registry_error: TunelabError | None = None  # registering failed (a store that does not answer): said last


def run_all(cfg: RunConfig) -> RunSummary:
    """prepare -> train -> eval (-> register, with track.register_as) in one go."""
    if cfg.eval.harness is not None:  # a benchmark that cannot run should not wait for training to say so
        from tunelab.eval.harness import check_harness

        check_harness(cfg)
    with opened_run(cfg, starting_training=True) as run:
        train_result = stage_train(cfg, run)
    eval_result = stage_eval(cfg, run, after_training=True)
    summary = RunSummary(run=run, train=train_result, eval=eval_result)
    if cfg.track.register_as is not None:  # also when the gate failed: the version records that, promotion refuses it
        from tunelab.registry import register

        try:
            summary.registered, summary.new_version = register(run.root, cfg.track.register_as)
        except TunelabError as err:  # the run and its eval are done and kept: register later by hand
            summary.registry_error = err
    return summary


def update_run_manifest(run: RunPaths, **sections: Any) -> None:
    current = json.loads(run.manifest.read_text()) if run.manifest.is_file() else {}
    current.update(manifest("run", config_sha256=sha256_file(run.config)), **_no_nan(sections))
    write_json_atomic(run.manifest, current)


def _no_nan(value: Any) -> Any:
    """NaN (a val loss with no val split) as null: strict JSON readers, browsers among them, refuse NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
