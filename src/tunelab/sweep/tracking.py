"""MLflow for a sweep: one parent run for the sweep, each trial's run its child (MLflow's mlflow.parentRunId tag,
which the UI nests). A trial's run is created with that tag and stamped into its run folder (mlflow_run.json),
so the trial's ordinary Tracker logs into it. Tracking never stops a sweep: if the store does not answer, the
parent is skipped and each trial falls back to the Tracker's own buffering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, write_json_atomic
from tunelab.config import RunConfig
from tunelab.progress import console
from tunelab.redaction import redact_uris
from tunelab.track import RUN_ID_FILE, artifact_root, mlflow_client, tracking_uri

PARENT_TAG = "mlflow.parentRunId"


def _client(cfg: RunConfig) -> Any:
    return mlflow_client(tracking_uri(cfg))


def _experiment_id(client: Any, cfg: RunConfig) -> str:
    found = client.get_experiment_by_name(cfg.track.experiment)
    if found is not None:
        return found.experiment_id
    location = None if cfg.track.tracking_uri else artifact_root(cfg)
    return client.create_experiment(cfg.track.experiment, artifact_location=location)


def open_parent(cfg: RunConfig, root: Path, run_id: str | None, spec: dict[str, Any]) -> str | None:
    """The sweep's parent run: created on the first start, marked running again on --resume."""
    if not cfg.track.enabled:
        return None
    try:
        client = _client(cfg)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(_experiment_id(client, cfg), run_name=root.name,
                                tags={"tunelab.sweep": "true", "tunelab.run_dir": str(root.resolve())})
        params = {f"sweep.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                  for k, v in spec.items() if k != "params"}
        params.update({f"sweep.params.{k}": json.dumps(v) for k, v in spec["params"].items()})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value[:6000])
        return run.info.run_id
    except Exception as err:  # noqa: BLE001 - a sweep goes on without its parent run
        console.print(f"[yellow]warning:[/] MLflow at {redact_uris(tracking_uri(cfg))} is not answering "
                      f"({type(err).__name__}); the sweep runs without its parent run")
        return None


def start_child(cfg: RunConfig, run: RunPaths, parent_id: str, params: dict[str, Any]) -> None:
    """Create the trial's MLflow run as a child of the sweep's and stamp it into the trial's run folder."""
    try:
        client = _client(cfg)
        created = client.create_run(
            _experiment_id(client, cfg), run_name=run.root.name,
            tags={PARENT_TAG: parent_id, "tunelab.run_dir": str(run.root.resolve()),
                  "tunelab.sweep_trial": json.dumps(params)})
    except Exception:  # noqa: BLE001 - the Tracker will try the store again itself, and buffer if it must
        return
    run.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.root / RUN_ID_FILE, {"run_id": created.info.run_id,
                                               "tracking_uri": redact_uris(tracking_uri(cfg))})


def end_child(cfg: RunConfig, run_dir: Path, status: str, reason: str) -> None:
    """End a trial's MLflow run that its own process could not end: KILLED when ASHA stopped it or a killed sweep
    cut it short (it starts over on --resume), FAILED when it raised. `reason` goes in a tag. KILLED wins over
    the FAILED a trial's training marks on its way out when Tune stops its worker."""
    stamp = run_dir / RUN_ID_FILE
    if not cfg.track.enabled or not stamp.is_file():
        return
    try:
        client = _client(cfg)
        run_id = json.loads(stamp.read_text())["run_id"]
        client.set_tag(run_id, "tunelab.sweep_trial_end", redact_uris(reason))
        if status == "KILLED" or client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - bookkeeping only
        pass


def close_parent(cfg: RunConfig, run_id: str | None, summary: dict[str, Any], files: list[Path]) -> None:
    """The sweep's result on its parent run: the best trial and its objective, the counts, sweep.html and
    best.yaml."""
    if run_id is None:
        return
    try:
        client = _client(cfg)
        for key, value in summary.get("metrics", {}).items():
            client.log_metric(run_id, key, float(value))
        for key, value in summary.get("tags", {}).items():
            client.set_tag(run_id, key, str(value))
        for path in files:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    except Exception as err:  # noqa: BLE001
        console.print(f"[yellow]warning:[/] could not log the sweep's result to MLflow ({type(err).__name__})")
