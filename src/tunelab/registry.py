"""The MLflow model registry: register a run's adapter, promote it only on evidence, resolve models:/ URIs.

A version carries what a consumer needs to use it right: the base model reference, the chat template it was
trained with, its eval metrics and whether its eval gate passed. `promote` refuses a version whose gate did
not pass unless forced with a recorded reason. `models:/NAME@alias` (or `models:/NAME/VERSION`) resolves to a
local run folder, so it works wherever a run folder does (eval, export, serve).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir, sha256_folder
from tunelab.errors import TunelabError
from tunelab.track import GATE_PASSED_TAG

DEFAULT_URI_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    return os.environ.get(DEFAULT_URI_ENV) or f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # set to INFO by MLflow on import
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _registry_errors(what: str, uri: str) -> Iterator[None]:
    """MLflow's own errors (unknown model, unreachable store) become one line naming the command."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        from tunelab.redaction import redact_uris

        raise TunelabError(redact_uris(f"registry {what}: {first} (registry at {uri})")) from None


def register(run_dir: Path, name: str) -> Any:
    """Create a model version from a run folder's adapter (logging the run first if it never was)."""
    from tunelab.config_file import load_run_config
    from tunelab.redaction import redact_uris
    from tunelab.track import Tracker, gate_tags, tracking_uri

    cfg, run = load_run_config(run_dir)
    if not run.has_adapter:
        raise TunelabError(f"registry register: {run.root} has no trained adapter to register")
    tracker = Tracker(cfg, run)
    if tracker.run_id is None or tracker.offline:
        raise TunelabError(f"registry register: MLflow at {redact_uris(tracking_uri(cfg))} is not answering")
    client = _client(tracking_uri(cfg))
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
    except Exception:  # noqa: BLE001 - "does not exist" is reported differently by each store
        client.create_registered_model(name, tags={"tunelab.base_model": cfg.model.name})
    source = f"{client.get_run(tracker.run_id).info.artifact_uri}/adapter"
    return client.create_model_version(name, source, run_id=tracker.run_id, tags=tags)


def promote(name: str, version: str, alias: str, force: bool, reason: str | None, uri: str) -> Any:
    with _registry_errors("promote", uri):
        return _promote(_client(uri), name, version, alias, force, reason)


def _promote(client: Any, name: str, version: str, alias: str, force: bool, reason: str | None) -> Any:
    mv = _version(client, name, version)
    passed = mv.tags.get(GATE_PASSED_TAG) == "true"
    if not passed and not force:
        rules = mv.tags.get("tunelab.gate", "[]")
        raise TunelabError(f"registry promote: {name} version {version} did not pass its eval gate (rules: {rules}); "
                           "evaluate it again, or pass --force --reason \"...\" to promote it anyway")
    if force and not passed:
        if not reason:
            raise TunelabError("registry promote: --force needs --reason \"why\"; the reason is recorded on the version")
        client.set_model_version_tag(name, version, "tunelab.forced_promotion", reason)
    client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def _version(client: Any, name: str, version: str) -> Any:
    try:
        return client.get_model_version(name, version)
    except Exception:  # noqa: BLE001
        raise TunelabError(f"registry: no version {version} of model '{name}'") from None


def list_models(uri: str) -> list[dict[str, Any]]:
    with _registry_errors("list", uri):
        return _list_models(_client(uri))


def _list_models(client: Any) -> list[dict[str, Any]]:
    out = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        out.append({"name": model.name, "versions": len(versions), "aliases": dict(model.aliases or {}),
                    "base_model": (model.tags or {}).get("tunelab.base_model", "")})
    return out


def show(name: str, uri: str) -> list[dict[str, Any]]:
    with _registry_errors("show", uri):
        return _show(_client(uri), name)


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
    client = _client(uri or default_tracking_uri())
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
            for item in ("adapter", "config.yaml", "data", "eval"):
                try:
                    client.download_artifacts(mv.run_id, item, str(tmp))
                except Exception:  # noqa: BLE001 - eval/ may be missing for an unevaluated version
                    if item in ("adapter", "config.yaml"):
                        raise TunelabError(f"{text}: run {mv.run_id} lacks its {item} artifact") from None
            shutil.copy(tmp / "adapter" / "chat_template.jinja", tmp / "chat_template.jinja")
            if not _adapter_matches(tmp, mv):
                raise TunelabError(f"{text}: the downloaded adapter's sha256 differs from the one recorded when "
                                   "the version was registered; refusing to use it (was the artifact changed?)")
    return folder


ADAPTER_HASH_TAG = "tunelab.adapter_sha256"


def _adapter_matches(folder: Path, mv: Any) -> bool:
    """Whether a copy's adapter/ is the one registered (versions registered before the hash was recorded pass)."""
    recorded = (mv.tags or {}).get(ADAPTER_HASH_TAG)
    return recorded is None or sha256_folder(RunPaths(folder).adapter) == recorded


def lookup_version(ref: str, uri: str | None = None) -> Any:
    """The model version a models:/NAME@ALIAS or models:/NAME/VERSION reference names (with its tags)."""
    return _lookup(_client(uri or default_tracking_uri()), ref)


def _lookup(client: Any, text: str) -> Any:
    spec = text[len("models:/"):] if text.startswith("models:/") else text
    if "@" in spec:
        name, alias = spec.split("@", 1)
        try:
            return client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001
            raise TunelabError(f"{text}: no model '{name}' with alias '{alias}' in the registry") from None
    name, _, version = spec.partition("/")
    if not version:
        raise TunelabError(f"{text}: name a version or an alias: models:/{name}@champion or models:/{name}/1")
    return _version(client, name, version)
