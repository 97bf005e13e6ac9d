"""MLflow tracking: data prep, training, eval and export log to one MLflow run per run folder (serving logs
nothing to MLflow).

Default: embedded, nothing to start (a sqlite store and an artifact folder beside the run folders).
`track.tracking_uri` points at a server instead. Tracking never costs training: when the store stops
answering, what would have been logged is appended to RUN_DIR/tracking_buffer.jsonl, a warning says so
once, and `tunelab runs sync RUN_DIR` uploads it later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, write_json_atomic
from tunelab.config import RunConfig
from tunelab.errors import ConfigError, TrackingError
from tunelab.progress import console
from tunelab.redaction import REDACTED, env_secrets, redact, redact_uris, redacted_config

BUFFER = "tracking_buffer.jsonl"
RUN_ID_FILE = "mlflow_run.json"
GATE_PASSED_TAG = "tunelab.gate_passed"  # "true" or "false", on the tracked run and on each registered version
MLFLOW_SETTINGS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's client retries a dead server with exponential backoff for minutes by default; tunelab should
    # notice within seconds: a tracker buffers and lets training go on, a command says the server is away.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def mlflow_client(uri: str, existing: bool = False) -> Any:
    """An MlflowClient for tracking and the registry at `uri`, with tunelab's MLflow settings (MLFLOW_SETTINGS,
    unless the environment sets them; MLflow's INFO lines about creating tables silenced). `existing`: the caller
    only reads, so a sqlite store that does not exist is an error rather than a new, empty store."""
    for key, value in MLFLOW_SETTINGS.items():
        os.environ.setdefault(key, value)
    from tunelab.config_paths import path_problem
    from tunelab.redaction import uri_credentials

    if uri_credentials(uri):  # MLflow prints "View run at URI/#/..." with the URI as given, password and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith("sqlite:///") and (problem := path_problem(Path(uri[len("sqlite:///"):]))):
        raise TrackingError(f"MLflow store {uri[len('sqlite:///'):]}: {problem}")
    if existing and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise TrackingError(f"no MLflow store at {uri[len('sqlite:///'):]}; pass --tracking-uri (or set "
                            "MLFLOW_TRACKING_URI) to the store the runs were tracked in")
    from mlflow import MlflowClient

    # Set after the import: MLflow sets its own logger to INFO when imported.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def unreachable(err: BaseException) -> bool:
    """Whether an MLflow failure means the server did not answer (refused, timed out), rather than an answer."""
    import requests

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def store_errors(what: str, uri: str) -> Iterator[None]:
    """MLflow's failures (a server that does not answer, a URI it cannot use, a file that is no store, a model it
    does not hold) as one line naming the command and the store, credentials redacted."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError, requests.RequestException) as err:  # the last: artifact downloads
        where = redact_uris(uri)
        if unreachable(err):
            raise TrackingError(f"{what}: MLflow at {where} is not answering; start it, or pass --tracking-uri (or "
                                "set MLFLOW_TRACKING_URI) to one that runs") from None
        text = err.orig if isinstance(err, DBAPIError) else err  # SQLAlchemy's own text repeats the SQL statement
        raise TrackingError(redact_uris(f"{what}: {_first_line(text)} (MLflow store {where})")) from None


def _first_line(err: BaseException | str) -> str:
    """An MLflow message's first line, without the link to its documentation it often ends with."""
    text = str(err).strip()
    return text.splitlines()[0].split(" See https://")[0].strip() if text else type(err).__name__


def check_store_uri(cfg: RunConfig) -> None:
    """A tracking URI MLflow has no store for (ftp://...) is the config's mistake: said before a stage writes
    anything, where the tracker itself starts only once the data is valid. A client for a server connects to
    nothing yet; file and sqlite stores are not opened here (that would create them)."""
    uri = tracking_uri(cfg)
    if cfg.track.enabled and "://" in uri and not uri.startswith(("sqlite:", "file:")):
        _configured_client(uri)


def _configured_client(uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client(uri)
    except MlflowException as err:  # a URI MLflow has no store for: the config's mistake, not an outage
        raise ConfigError(redact_uris(f"track.tracking_uri: {_first_line(err)}")) from None


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.track.tracking_uri and REDACTED in cfg.track.tracking_uri and os.environ.get("MLFLOW_TRACKING_URI"):
        # A stored config has its URI's credentials redacted: the environment holds the real one.
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.track.tracking_uri:
        return cfg.track.tracking_uri
    return f"sqlite:///{(Path(cfg.output.dir).resolve().parent / 'mlflow.db')}"


def artifact_root(cfg: RunConfig) -> str:
    return (Path(cfg.output.dir).resolve().parent / "mlartifacts").as_uri()


def gate_tags(metrics: dict[str, Any] | None) -> dict[str, str]:
    """The gate's verdict and rules as the tracked run and a registered version carry them. No eval yet (None):
    not passed, since promotion needs evidence."""
    from tunelab.eval.result import gate_passed

    if metrics is None:
        return {GATE_PASSED_TAG: "false"}
    rules = [g["rule"] for g in metrics.get("gate", [])]
    # A gate without rules (eval.gate: []) lets `tunelab eval` exit 0, but it is no evidence to promote on.
    return {GATE_PASSED_TAG: str(bool(rules) and gate_passed(metrics)).lower(), "tunelab.gate": json.dumps(rules)}


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.learning_rate": "0.0002", ...} (MLflow params are flat strings)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data) if isinstance(data, (list, dict)) else str(data)}


class Tracker:
    """Logs one run folder's stages to its MLflow run; falls back to a local buffer when MLflow is away."""

    def __init__(self, cfg: RunConfig, run: RunPaths) -> None:
        self.cfg, self.run = cfg, run
        self.secrets = env_secrets(cfg.model_dump(mode="json"))
        self.client = _configured_client(tracking_uri(cfg))
        self.offline = False
        self.run_id = self._run_id()

    # -- run identity -------------------------------------------------------------------------------
    def _run_id(self) -> str | None:
        stamp = self.run.root / RUN_ID_FILE
        if stamp.is_file():
            return json.loads(stamp.read_text())["run_id"]
        try:
            experiment = self.client.get_experiment_by_name(self.cfg.track.experiment)
            location = None if self.cfg.track.tracking_uri else artifact_root(self.cfg)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                self.cfg.track.experiment, artifact_location=location)
            created = self.client.create_run(experiment_id, run_name=self._run_name(),
                                             tags={"tunelab.run_dir": str(self.run.root.resolve()), **self._tags()})
        except Exception as err:  # noqa: BLE001 - any store failure means: keep training, buffer
            self._go_offline(err)
            return None
        write_json_atomic(stamp, {"run_id": created.info.run_id, "tracking_uri": redact_uris(tracking_uri(self.cfg))})
        return created.info.run_id

    def _registered(self) -> dict[str, str] | None:
        """In a registered version's local copy (evaluated again): its name, version and source run id."""
        return json.loads(self.run.registered.read_text()) if self.run.registered.is_file() else None

    def _run_name(self) -> str:
        """The folder's name; for a registered version's local copy, NAME vVERSION eval."""
        found = self._registered()
        return f"{found['name']} v{found['version']} eval" if found else self.run.root.name

    def _tags(self) -> dict[str, str]:
        """What `tunelab runs list` shows of every run, even one that only evaluates (and so logs no config)."""
        tags = {"tunelab.base_model": redact_uris(self.cfg.model.name), "tunelab.method": self.cfg.method.type,
                "tunelab.objective": self.cfg.objective.type}
        found = self._registered()
        if found:
            tags.update({"tunelab.registered_model": f"{found['name']}/{found['version']}",
                         "tunelab.source_run": found["run_id"]})
        return tags

    # -- logging with a safety net --------------------------------------------------------------------
    def _call(self, op: str, **payload: Any) -> None:
        if self.offline or self.run_id is None:
            self._buffer(op, payload)
            return
        try:
            _apply(self.client, self.run_id, op, payload)
        except Exception as err:  # noqa: BLE001
            self._go_offline(err)
            self._buffer(op, payload)

    def _go_offline(self, err: Exception) -> None:
        if not self.offline:
            where = redact_uris(tracking_uri(self.cfg))
            console.print(f"[yellow]warning:[/] MLflow at {where} is not answering ({type(err).__name__}); "
                          f"training goes on and tracking is buffered in {self.run.root / BUFFER}; upload it later "
                          f"with `tunelab runs sync {self.run.root}`")
        self.offline = True

    def _buffer(self, op: str, payload: dict[str, Any]) -> None:
        payload = redact(payload, self.secrets)  # the buffer is a file in the run folder: no secret in clear
        with open(self.run.root / BUFFER, "a", encoding="utf-8") as f:
            f.write(json.dumps({"op": op, "time": time.time(), **payload}) + "\n")

    # -- what the stages log ----------------------------------------------------------------------------
    def log_config(self) -> None:
        params = flatten(redacted_config(self.cfg))  # MLflow params are readable by anyone with the store
        self._call("params", params=params)
        self._call("tags", tags=self._tags())

    def log_dataset(self, manifest: dict[str, Any]) -> None:
        self._call("dataset", name=f"{self.run.root.name}-data", digest=manifest.get("fingerprint", "")[:32],
                   source=str(self.run.data.resolve()), counts=manifest.get("counts", {}))

    def log_metrics(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        values = {k.replace("/", "_"): float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and v == v}  # v == v drops NaN
        if values:
            self._call("metrics", step=step, metrics=values)

    def log_eval(self, metrics: dict[str, Any]) -> None:
        flat = {}
        for suite, result in metrics.get("suites", {}).items():
            for system, values in result["systems"].items():
                flat.update({f"eval.{suite}.{system}.{k}": float(v) for k, v in values.items() if v == v})
            if "n_examples" in result:  # a score on 10 examples is not one on 600: lists show the count beside it
                flat[f"eval.{suite}.n_examples"] = float(result["n_examples"])
        forgetting = metrics.get("forgetting") or {}
        flat.update({f"forgetting.{k}": float(v) for k, v in forgetting.items() if isinstance(v, (int, float))})
        for task, scores in ((metrics.get("harness") or {}).get("tasks") or {}).items():
            name = re.sub(r"[^\w\-. :/]", "_", task)  # MLflow refuses other characters in metric names
            flat.update({f"harness.{name}.{k}": float(scores[k]) for k in ("base", "tuned", "drop") if k in scores})
        self._call("metrics", step=0, metrics=flat)
        self._call("tags", tags=gate_tags(metrics))
        self.log_folder(self.run.eval, "eval")
        self._log_manifest()

    def _log_manifest(self) -> None:
        """The run's manifest.json (base model's identity, data counts, training and eval summaries) as it stands
        now, replacing the one logged before: a registered version's local copy carries it too."""
        if self.run.manifest.is_file():
            self.log_folder(self.run.manifest, None)

    def log_folder(self, path: Path, artifact_path: str | None) -> None:
        """A folder (or file) of the run as MLflow artifacts."""
        self._call("artifacts", path=str(path), artifact_path=artifact_path)

    def log_data(self, data: Path) -> None:
        """Data prep: the Dataset folder as the run's input, and its report (counts per filter, duplicates,
        contamination) and manifest as artifacts under data_prep/. Not data/: registering a version uploads the
        whole Dataset folder there, and a registered version is read back from it (registry.py)."""
        self.log_dataset(json.loads((data / "manifest.json").read_text()))
        for name in ("report.json", "report.md", "manifest.json"):
            if (data / name).is_file():
                self.log_folder(data / name, "data_prep")

    def log_export(self, folder: Path, report: Path) -> None:
        """An export of this run: its verification report as an artifact under export/FOLDER/, its numbers as
        metrics export.FOLDER.* and where it was written as a tag (the exported weights stay on disk)."""
        name = re.sub(r"[^\w\-.]", "_", folder.name)  # MLflow refuses other characters in metric and tag names
        numbers = json.loads(report.read_text())
        self._call("metrics", step=0, metrics={f"export.{name}.{k}": float(v) for k, v in numbers.items()
                                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self._call("tags", tags={f"tunelab.export.{name}": str(folder.resolve())})
        self.log_folder(report, f"export/{name}")

    def log_trained(self) -> None:
        for folder in (self.run.adapter, self.run.model):
            if folder.is_dir():
                self.log_folder(folder, folder.name)
        self.log_folder(self.run.config, None)
        self._log_manifest()

    def system_metrics(self) -> Any:
        """MLflow's CPU/memory/GPU sampler for the duration of training (None when offline)."""
        if self.offline or self.run_id is None:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=tracking_uri(self.cfg))
        monitor.start()
        return monitor

    @staticmethod
    def stop_system_metrics(monitor: Any) -> None:
        """Log one last sample (a short run may end before the first interval) and stop the sampler."""
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
        except Exception:  # noqa: BLE001 - system metrics are a nicety; never fail training over them
            pass
        monitor.finish()

    def mark_running(self) -> None:
        """Training starts: the run may have been ended before (by `tunelab data prep`, or an interrupted try)."""
        self._call("status", status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        self._call("terminate", status=status)


def _apply(client: Any, run_id: str, op: str, payload: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    if op == "params":
        items = list(payload["params"].items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[start : start + 100]])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload["tags"].items()])
    elif op == "metrics":
        stamp = int(payload.get("time", time.time()) * 1000)
        metrics = [Metric(k, v, stamp, payload["step"]) for k, v in payload["metrics"].items()]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
    elif op == "dataset":
        from mlflow.data import get_source  # noqa: F401 - registers the built-in source types
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset

        # Named as a local source: left to guess from the URI, MLflow finds two registrations that fit (one for
        # file:// URIs, one for plain paths) and warns on every run.
        source = get_dataset_source_from_json(json.dumps({"uri": Path(payload["source"]).as_uri()}), "local")
        dataset = MetaDataset(source=source, name=payload["name"], digest=payload["digest"])
        client.log_inputs(run_id, datasets=[_dataset_input(dataset)])
    elif op == "artifacts" and Path(payload["path"]).is_dir():
        client.log_artifacts(run_id, payload["path"], payload["artifact_path"])
    elif op == "artifacts":
        client.log_artifact(run_id, payload["path"], payload["artifact_path"])
    elif op == "status":
        client.update_run(run_id, status=payload["status"])
    elif op == "terminate":
        client.set_terminated(run_id, payload["status"])
    else:
        raise ValueError(f"unknown tracking op {op}")


def _dataset_input(dataset: Any) -> Any:
    from mlflow.entities import DatasetInput

    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[])


def sync(run_dir: Path) -> int:
    """Upload what a run buffered while MLflow was away; returns the number of operations sent."""
    from tunelab.config_file import load_run_config

    cfg, run = load_run_config(run_dir)
    buffer = run.root / BUFFER
    if not buffer.is_file():
        return 0
    tracker = Tracker(cfg, run)
    if tracker.run_id is None or tracker.offline:
        raise TrackingError(f"runs sync: MLflow at {redact_uris(tracking_uri(cfg))} is still not answering; nothing "
                            "was uploaded")
    client = tracker.client
    ops = [json.loads(line) for line in buffer.read_text(encoding="utf-8").splitlines() if line.strip()]
    for op in ops:
        _apply(client, tracker.run_id, op.pop("op"), op)
    buffer.rename(buffer.with_suffix(".synced.jsonl"))
    return len(ops)
