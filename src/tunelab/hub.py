"""Hugging Face Hub models and datasets, resolved through the Hub libraries' own caches.

`model.name: ORG/NAME` is fetched with `snapshot_download` into the standard cache (`HF_HUB_CACHE`, shared with
every other Hugging Face tool), so `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` mean what they mean elsewhere.
Only what tunelab loads is fetched: config, tokenizer, chat template and safetensors weights. Two kinds of repo
are refused before any weights are fetched, because loading them runs code from the repo: pickle-only weights
(`pytorch_model.bin`), and a config whose `auto_map` names the repo's own Python classes (unless
`model.trust_remote_code: true`). `data.train: hf://ORG/NAME` goes through `datasets.load_dataset` and its cache.
Every failure is one line naming `model.name` or the data source.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import sha256_file, sha256_text, write_json_atomic
from tunelab.config import ModelConfig
from tunelab.errors import DataError, ModelError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
DATASET_PREFIX = "hf://"

# What tunelab loads from a model repo. Weights are only the names transformers itself loads, so a repo that also
# ships ONNX, GGUF or "original/" checkpoints does not cost their download.
CONFIG_FILES = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
]
WEIGHT_FILES = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class HubSnapshot:
    """A model repo at one commit, in huggingface_hub's cache (`.../models--ORG--NAME/snapshots/COMMIT`)."""

    repo_id: str
    revision: str  # as asked: a branch, tag or commit
    commit: str
    folder: Path


def is_hub_id(name: str) -> bool:
    """ORG/NAME: exactly one slash, characters the Hub allows, not a .gguf, and no local file or folder so named."""
    return HUB_ID.fullmatch(name) is not None and not name.endswith(".gguf") and not Path(name).exists()


def fetch_model(cfg: ModelConfig, weights: bool) -> HubSnapshot:
    """The snapshot of `cfg.name` at `cfg.revision`: config and tokenizer, plus the safetensors weights when
    `weights`. The repo is checked (no pickles, no remote code) before any weights are fetched."""
    patterns = [*CONFIG_FILES, *(["*.py"] if cfg.trust_remote_code else [])]
    snapshot = _snapshot(cfg, patterns)
    _check_loadable(cfg, snapshot)
    return _snapshot(cfg, [*patterns, *WEIGHT_FILES]) if weights else snapshot


def portable_base(cfg: ModelConfig, loaded_from: str | None = None) -> tuple[str, str | None]:
    """(name, revision) an adapter should record as its base so it loads on another machine: the Hub ID and the
    commit; otherwise `model.name` as configured (the bundled name, or the path given), with no revision.
    `loaded_from`: the folder the base was loaded from, whose name is the commit when it is a Hub snapshot."""
    if not is_hub_id(cfg.name):
        return cfg.name, None
    folder = Path(loaded_from or "")
    if folder.parent.name == "snapshots" and COMMIT.fullmatch(folder.name):
        return cfg.name, folder.name  # the commit actually trained on, even if the branch has moved since
    return cfg.name, fetch_model(cfg, weights=False).commit


def name_base_in_adapter(cfg: ModelConfig, adapter_dir: Path) -> None:
    """Rewrite `adapter_config.json` to name the base portably. PEFT records the folder the base was loaded from,
    which for a Hub or GGUF model is a machine-local cache path that AutoPeftModel cannot find elsewhere."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():  # a full fine-tune saves a whole model, not an adapter
        return
    spec = json.loads(path.read_text())
    spec["base_model_name_or_path"], spec["revision"] = portable_base(cfg, spec.get("base_model_name_or_path"))
    write_json_atomic(path, spec)


# ------------------------------------------------------------------------------------------------ models


def _where(cfg: ModelConfig) -> str:
    return f"model.name: {cfg.name}" + (f" (revision {cfg.revision})" if cfg.revision else "") + _mistyped_path(cfg)


def _mistyped_path(cfg: ModelConfig) -> str:
    """`models/typo` when ./models exists reads as a Hub ID (ORG/NAME) but was meant as a folder: say so."""
    first = Path(cfg.name).parts[0] if Path(cfg.name).parts else ""
    if first and Path(first).is_dir():
        return f" (read as a Hub ID: there is no folder {Path(cfg.name).resolve()})"
    return ""


def _snapshot(cfg: ModelConfig, patterns: list[str]) -> HubSnapshot:
    from huggingface_hub import constants, is_offline_mode, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where, revision = _where(cfg), cfg.revision or "main"
    unreachable = None
    try:
        unreachable = None if is_offline_mode() else _probe(cfg.name, revision)
        folder = snapshot_download(
            cfg.name, revision=revision, allow_patterns=patterns, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
            local_files_only=is_offline_mode() or unreachable is not None,
        )
    except GatedRepoError:
        raise ModelError(f"{where}: the repo is gated; accept its terms at {constants.ENDPOINT}/{cfg.name} and set "
                         "HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{where}: no such model repo on the Hub (a private one needs HF_TOKEN set to a token that "
                         "can read it)") from None
    except RevisionNotFoundError:
        raise ModelError(f"model.revision: '{revision}' is not a branch, tag or commit of {cfg.name}") from None
    except IncompleteSnapshotError:
        raise ModelError(f"{where}: the cached snapshot is missing files and the Hub cannot be reached "
                         f"({_offline_reason(unreachable)}); run once online to complete it") from None
    except LocalEntryNotFoundError as err:
        if is_offline_mode():
            raise ModelError(f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                             "is set; run once online to download it, or set HF_HUB_OFFLINE=0") from None
        cause = unreachable or err.__cause__ or err
        raise ModelError(f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({_one_line(cause)}) and it is "
                         "not in the cache; check the network or HF_ENDPOINT") from None
    except HfHubHTTPError as err:
        raise ModelError(f"{where}: the Hub answered {_one_line(err)}") from None
    except HFValidationError as err:
        raise ModelError(f"{where}: not a valid Hub ID: {_first_line(err)}") from None
    folder = Path(folder)
    return HubSnapshot(cfg.name, revision, folder.name, folder)


def _probe(repo_id: str, revision: str) -> Exception | None:
    """Ask the Hub about the repo with a short timeout; return why it cannot be reached, or None.

    snapshot_download's own first request has no timeout, so an endpoint that drops packets would hang it for
    minutes; after a failed probe only the cache is used. HF_HUB_ETAG_TIMEOUT sets the limit (default 10 s).
    """
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except httpx2.TransportError as err:  # refused, unresolvable, timed out: the Hub is not there
        return err
    except HfHubHTTPError as err:
        if err.response.status_code >= 500:  # the Hub is down: the cache may still serve
            return err
        raise
    return None


def _offline_reason(unreachable: Exception | None) -> str:
    return "HF_HUB_OFFLINE is set" if unreachable is None else _one_line(unreachable)


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _check_loadable(cfg: ModelConfig, snapshot: HubSnapshot) -> None:
    check_model_files(_where(cfg), snapshot.folder, _repo_files(snapshot), cfg.trust_remote_code, "repo")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tekken.json")


def check_model_files(where: str, folder: Path, files: list[str], trust_remote_code: bool, noun: str) -> None:
    """What a Hub repo and a local folder must both hold before tunelab loads them: a config, a tokenizer,
    safetensors weights (a pickle runs code when loaded), and no code of their own unless it is trusted.
    `files`: every file (a repo's listing; a folder's contents), `folder`: where config and tokenizer are."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{where}: the {noun} has no config.json; is it a transformers model?")
    with_code = [name for name in ("config.json", "tokenizer_config.json")
                 if (folder / name).is_file() and "auto_map" in json.loads((folder / name).read_text())]
    if with_code and not trust_remote_code:
        raise ModelError(f"{where}: the {noun} needs its own Python code ({' and '.join(with_code)}: auto_map), which "
                         "tunelab does not run unless you set model.trust_remote_code: true (read that code first)")
    if not _weight_files(files):
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelError(f"{where}: the {noun} has only pickle weights ({', '.join(pickles[:3])}); unpickling "
                             "can run arbitrary code, so tunelab loads only safetensors; "
                             + ("pick a repo or revision with model.safetensors" if noun == "repo" else
                                "convert it once where you trust the file: from_pretrained(FOLDER)."
                                "save_pretrained(NEW_FOLDER) writes model.safetensors"))
        raise ModelError(f"{where}: the {noun} has no safetensors weights (model.safetensors)")
    if not any(f.rsplit("/", 1)[-1] in TOKENIZER_FILES or f.endswith(".tiktoken") for f in files):
        fix = ("pick a repo that ships one" if noun == "repo"
               else "save it beside the weights with tokenizer.save_pretrained")
        raise ModelError(f"{where}: the {noun} has no tokenizer ({', '.join(TOKENIZER_FILES)}); {fix}")


def _repo_files(snapshot: HubSnapshot) -> list[str]:
    """Every file of the repo at the commit, without fetching any. huggingface_hub caches the full listing beside
    the snapshot; a cache written without it (by hand, or by an older version) tells only what it holds."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(snapshot.repo_id, revision=snapshot.commit)]
    except CachedRepoTreeNotFoundError:
        return _files_in(snapshot.folder)


def _files_in(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _weight_files(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(".safetensors") and any(fnmatch.fnmatch(f, p) for p in WEIGHT_FILES)]


# ---------------------------------------------------------------------------------------------- datasets


def is_hub_dataset(path: Path | str) -> bool:
    """A data source written hf://ORG/NAME (kept as a string by the config: a Path would collapse the //)."""
    return isinstance(path, str) and path.startswith(DATASET_PREFIX)


def dataset_label(path: str, split: str, subset: str | None) -> str:
    """How errors and row locations name a Hub dataset source: `hf://org/name split train`."""
    return f"{path}{f' subset {subset}' if subset else ''} split {split}"


def load_hub_dataset(path: str, split: str, subset: str | None) -> Any:
    """`datasets.load_dataset(ORG/NAME, subset, split=split)`, through the datasets cache. Offline
    (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) it reads what an earlier online load left in that cache."""
    import datasets

    label = dataset_label(path, split, subset)
    repo_id = path.removeprefix(DATASET_PREFIX)
    try:
        # "hf://datasets/" makes datasets look on the Hub (or in its cache) only, never in a local folder so named.
        return datasets.load_dataset(f"hf://datasets/{repo_id}", subset, split=split)
    except ConnectionError:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{label}: not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) and offline "
                            "mode is set; run once online to download it, or set HF_HUB_OFFLINE=0 "
                            "(and HF_DATASETS_OFFLINE=0)") from None
        raise DataError(f"{label}: cannot reach the Hub at {datasets.config.HF_ENDPOINT} and it is not in the "
                        "datasets cache; check the network or HF_ENDPOINT") from None
    except Exception as err:  # datasets raises a dozen types (not found, gated, unknown split or subset, no files)
        raise DataError(f"{label}: {_first_line(err)}") from None


def dataset_record(path: str, split: str, subset: str | None) -> dict[str, Any]:
    """What identifies a Hub dataset source in the data manifest: its commit and a hash of the rows read.

    The datasets cache keeps a Hub load in `.../ORG___NAME/SUBSET/VERSION/COMMIT/`, so the commit is that folder's
    name; the hash covers the cached Arrow files, as a local source's covers its file."""
    data = load_hub_dataset(path, split, subset)
    files = sorted(Path(f["filename"]) for f in data.cache_files)
    commit = files[0].parent.name if files and COMMIT.fullmatch(files[0].parent.name) else None
    content = ("".join(sha256_file(f) for f in files) if files
               else json.dumps(data.to_list(), sort_keys=True, default=str))
    return {"path": path, "subset": subset, "split": split, "commit": commit, "sha256": sha256_text(content)}
