"""The MLflow model registry: register a run's adapter, promote it only on evidence, resolve models:/ URIs.

A version carries what a consumer needs to use it right: the base model reference, the chat template it was
trained with, its eval metrics and whether its eval gate passed. `promote` refuses a version whose gate did
not pass unless forced with a recorded reason. `models:/NAME@alias` (or `models:/NAME/VERSION`) resolves to a
local run folder, so it works wherever a run folder does (eval, export, serve).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir, sha256_folder, write_json_atomic
from tunelab.errors import TrackingError, TunelabError
from tunelab.track import GATE_PASSED_TAG, mlflow_client, store_errors, unreachable

DEFAULT_URI_ENV = "MLFLOW_TRACKING_URI"
# What a store answers for a model, version or alias it does not hold (an unknown alias is a bad parameter).
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def default_tracking_uri() -> str:
    return os.environ.get(DEFAULT_URI_ENV) or f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"


def register(run_dir: Path, name: str) -> tuple[Any, bool]:
    """A model version of a run folder's adapter (logging the run first if it never was), and whether it is new:
    a version already registered from this run with the same adapter and eval is returned as it is."""
    from tunelab.config_file import load_run_config
    from tunelab.track import tracking_uri

    cfg, run = load_run_config(run_dir)
    if not run.has_adapter:
        raise TunelabError(f"registry register: {run.root} has no trained adapter to register")
    _check_eval_is_of(run)
    uri = tracking_uri(cfg)
    with store_errors("registry register", uri):
        client = mlflow_client(uri)
        client.search_experiments(max_results=1)  # a store that does not answer: say so, before the Tracker buffers
        return _register(client, cfg, run, name)


def _check_eval_is_of(run: RunPaths) -> None:
    """A version pairs an adapter with its evidence: an eval of weights trained again since is not evidence."""
    path = run.eval / "metrics.json"
    measured = json.loads(path.read_text()).get("trained_sha256") if path.is_file() else None
    if measured is not None and measured != sha256_folder(run.adapter):  # older evals recorded no hash
        raise TunelabError(f"registry register: {run.root}'s eval measured other weights than its adapter/ holds now "
                           f"(trained again since); evaluate it again first: tunelab eval {run.root}")


def _register(client: Any, cfg: Any, run: RunPaths, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    from tunelab.redaction import redact_uris
    from tunelab.track import Tracker, gate_tags, tracking_uri

    tracker = Tracker(cfg, run)
    if tracker.run_id is None or tracker.offline:
        raise TrackingError(f"registry register: MLflow at {redact_uris(tracking_uri(cfg))} is not answering")
    logged = {a.path for a in client.list_artifacts(tracker.run_id)}
    if "adapter" not in logged:  # trained with tracking off: log it now
        tracker.log_trained()
    if "data" not in logged:
        tracker.log_folder(run.data, "data")
    if run.eval.is_dir() and "eval" not in logged:
        tracker.log_folder(run.eval, "eval")
    tags = {"tunelab.base_model": cfg.model.name, "tunelab.method": cfg.method.type,
            "tunelab.objective": cfg.objective.type, "tunelab.run_dir": str(run.root.resolve()),
            # Checked whenever the version is downloaded and used (resolve_run_dir, serving's admin loads).
            ADAPTER_HASH_TAG: sha256_folder(run.adapter),
            # A base model's continued pre-training has no template.
            "tunelab.chat_template": run.chat_template.read_text(encoding="utf-8")[:7000]
            if run.chat_template.is_file() else ""}
    metrics_path = run.eval / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    tags.update(gate_tags(metrics))
    for suite, result in (metrics or {}).get("suites", {}).items():
        for system, values in result["systems"].items():
            for metric, value in values.items():
                tags[f"eval.{suite}.{system}.{metric}"] = f"{value:.6g}"
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags={"tunelab.base_model": cfg.model.name})
    same = _same_version(client, name, tracker.run_id, tags)
    if same is not None:
        return same, False
    source = f"{client.get_run(tracker.run_id).info.artifact_uri}/adapter"
    return client.create_model_version(name, source, run_id=tracker.run_id, tags=tags), True


def _same_version(client: Any, name: str, run_id: str, tags: dict[str, str]) -> Any:
    """A version of `name` already made from this run with this very adapter and evidence, if any: registering
    twice (a re-run pipeline step) must not make a second version that differs in nothing but its number. A run
    re-evaluated since (other gate, other metrics) is new evidence, and gets a new version."""
    evidence = {k: v for k, v in tags.items() if k in (ADAPTER_HASH_TAG, GATE_PASSED_TAG, "tunelab.gate")
                or k.startswith("eval.")}
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):  # a run id is hex: safe to quote
        recorded = mv.tags or {}
        if mv.name == name and all(recorded.get(k) == v for k, v in evidence.items()) \
                and not any(k.startswith("eval.") and k not in evidence for k in recorded):
            return mv
    return None


def promote(name: str, version: str, alias: str, force: bool, reason: str | None, uri: str) -> Any:
    with store_errors("registry promote", uri):
        return _promote(mlflow_client(uri, existing=True), name, version, alias, force, reason)


def _promote(client: Any, name: str, version: str, alias: str, force: bool, reason: str | None) -> Any:
    mv = _version(client, name, version)
    passed = mv.tags.get(GATE_PASSED_TAG) == "true"
    if not passed and not force:
        rules = mv.tags.get("tunelab.gate", "[]")
        if rules == "[]":
            raise TunelabError(f"registry promote: {name} version {version} has no eval gate (no rules were in force, "
                               "or it was never evaluated): no evidence to promote on; register a run evaluated "
                               "with a gate, or pass --force --reason \"...\" to promote it anyway")
        raise TunelabError(f"registry promote: {name} version {version} did not pass its eval gate (rules: {rules}); "
                           "a version's recorded result does not change: register a run that passes, or pass "
                           "--force --reason \"...\" to promote it anyway")
    if force and not passed:
        if not reason:
            raise TunelabError("registry promote: --force needs --reason \"why\"; the reason is recorded on the version")
        client.set_model_version_tag(name, version, "tunelab.forced_promotion", reason)
    client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def _version(client: Any, name: str, version: str) -> Any:
    _found(lambda: client.get_registered_model(name), f"registry: no model '{name}' in the registry (see tunelab "
                                                        "registry list)")
    return _found(lambda: client.get_model_version(name, version), f"registry: no version {version} of model '{name}' "
                                                                   f"(see tunelab registry show {name})")


def _found(ask: Any, missing: str) -> Any:
    """The registry's answer to `ask()`; "not found" becomes TrackingError(missing). Any other failure is not an
    answer (a server that is away) and propagates: store_errors says so."""
    from mlflow.exceptions import MlflowException

    try:
        return ask()
    except MlflowException as err:
        if err.error_code not in NOT_FOUND:
            raise
        raise TrackingError(missing) from None


def list_models(uri: str) -> list[dict[str, Any]]:
    with store_errors("registry list", uri):
        return _list_models(mlflow_client(uri, existing=True))


def _list_models(client: Any) -> list[dict[str, Any]]:
    out = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        out.append({"name": model.name, "versions": len(versions), "aliases": dict(model.aliases or {}),
                    "base_model": (model.tags or {}).get("tunelab.base_model", "")})
    return out


def show(name: str, uri: str) -> list[dict[str, Any]]:
    with store_errors("registry show", uri):
        return _show(mlflow_client(uri, existing=True), name)


def _show(client: Any, name: str) -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        rows.append({"version": str(mv.version), "aliases": aliases.get(str(mv.version), []), "run_id": mv.run_id,
                     "gate_passed": mv.tags.get(GATE_PASSED_TAG), "forced": mv.tags.get("tunelab.forced_promotion"),
                     "metrics": {k: v for k, v in mv.tags.items() if k.startswith("eval.")}})
    return rows


def resolve_run_dir(ref: str | Path, uri: str | None = None) -> Path:
    """A run folder for `ref`: itself, or the local copy of a registered version for models:/NAME@alias."""
    text = str(ref)
    if not text.startswith("models:/"):
        return Path(text)
    uri = uri or default_tracking_uri()
    with store_errors(text, uri):
        return _local_copy(mlflow_client(uri, existing=True), text)


def _local_copy(client: Any, text: str) -> Path:
    mv = _lookup(client, text)
    name = mv.name
    from tunelab.config import ModelConfig
    from tunelab.models import cache_root

    # Keyed by run id too: two stores (or a re-created one) can both hold a "version 1".
    folder = cache_root(ModelConfig()) / "registry" / name / f"{mv.version}-{mv.run_id[:12]}"
    if (folder / "config.yaml").is_file() and not _adapter_matches(folder, mv):
        shutil.rmtree(folder)  # a cached copy changed since it was downloaded: fetch it again
    if not (folder / "config.yaml").is_file():
        with atomic_dir(folder) as tmp:
            for item in ("adapter", "config.yaml", "data", "eval", "manifest.json"):
                try:
                    client.download_artifacts(mv.run_id, item, str(tmp))
                except Exception as err:  # noqa: BLE001 - eval/ (not evaluated), manifest.json (older runs) may lack
                    if unreachable(err):
                        raise
                    if item in ("adapter", "config.yaml"):
                        raise TrackingError(f"{text}: run {mv.run_id} lacks its {item} artifact") from None
            template = tmp / "adapter" / "chat_template.jinja"
            if template.is_file():  # continued pre-training of a base model trains without a template
                shutil.copy(template, RunPaths(tmp).chat_template)
            if not _adapter_matches(tmp, mv):
                raise TrackingError(f"{text}: the downloaded adapter's sha256 differs from the one recorded when "
                                    "the version was registered; refusing to use it (was the artifact changed?)")
    if not RunPaths(folder).registered.is_file():  # copies made before the marker existed get it now
        # Evaluating the copy logs to a new MLflow run; the marker names it after the version, not the folder.
        write_json_atomic(RunPaths(folder).registered, {"name": name, "version": str(mv.version), "run_id": mv.run_id})
    return folder


ADAPTER_HASH_TAG = "tunelab.adapter_sha256"


def _adapter_matches(folder: Path, mv: Any) -> bool:
    """Whether a copy's adapter/ is the one registered (versions registered before the hash was recorded pass)."""
    recorded = (mv.tags or {}).get(ADAPTER_HASH_TAG)
    return recorded is None or sha256_folder(RunPaths(folder).adapter) == recorded


def lookup_version(ref: str, uri: str | None = None) -> Any:
    """The model version a models:/NAME@ALIAS or models:/NAME/VERSION reference names (with its tags)."""
    uri = uri or default_tracking_uri()
    with store_errors(ref, uri):
        return _lookup(mlflow_client(uri, existing=True), ref)


def _lookup(client: Any, text: str) -> Any:
    spec = text[len("models:/"):] if text.startswith("models:/") else text
    if "@" in spec:
        name, alias = spec.split("@", 1)
        return _found(lambda: client.get_model_version_by_alias(name, alias),
                      f"{text}: no model '{name}' with alias '{alias}' in the registry")
    name, _, version = spec.partition("/")
    if not version:
        raise TunelabError(f"{text}: name a version or an alias: models:/{name}@champion or models:/{name}/1")
    return _version(client, name, version)
