"""What the server may load: adapter names, where their run folders may live, and whether they fit the base.

An adapter is a trained LoRA run folder (or a `models:/NAME@ALIAS` registry URI, resolved to a local copy).
It is served with its own chat template and system prompt, read from the run, so a request to an adapter
renders exactly the prompt that adapter was trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ServeError, cut

BASE_NAME = "base"
# Letters, digits, dot, dash, underscore; no slashes, so a name can never become a path.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class AdapterSpec:
    name: str
    run_dir: Path  # the run folder (for registry URIs: the local copy)
    source: str  # what the user gave: a path or a models:/ URI
    adapter_dir: Path
    base_folder: Path
    system_prompt: str | None
    rank: int
    chat_template: str | None = None  # the run's data.chat_template: what a run that saved no template chats in

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "run_dir": str(self.run_dir), "rank": self.rank}


def check_name(name: str) -> str:
    if name == BASE_NAME or name == "__base__":
        raise ServeError(f"adapter name '{cut(name)}' is reserved for the base model")
    if not NAME_PATTERN.fullmatch(name):  # fullmatch: `$` alone would let a trailing newline through
        raise ServeError(f"adapter name '{cut(name)}': use 1-64 letters, digits, '.', '-' or '_', starting with a "
                         "letter or digit")
    return name


def inside_allowed_roots(path: Path, roots: list[Path]) -> Path:
    """`path` with symlinks and '..' resolved, if it lies inside one of `roots`; refuses anything else."""
    real = path.expanduser().resolve()
    for root in roots:
        if real == root.resolve() or real.is_relative_to(root.resolve()):
            return real
    allowed = ", ".join(str(r) for r in roots) or "(none)"
    raise ServeError(f"adapter path {path}: outside the allowed roots ({allowed}); start the server with "
                     "--allow-root to permit it", status=403, code="forbidden_path")


def check_path_text(text: str) -> None:
    """Refuse path text the file system cannot even look at (NUL bytes, over-long names) with a clean 400."""
    if "\x00" in text:
        raise ServeError("adapter path: contains a NUL byte")
    if len(text.encode()) > 4096 or any(len(part.encode()) > 255 for part in text.split("/")):
        raise ServeError("adapter path: too long (at most 4096 bytes, 255 per folder name)")


def registry_name(source: str) -> str:
    """The registered model's name in models:/NAME@ALIAS or models:/NAME/VERSION."""
    spec = source[len("models:/"):]
    return spec.split("@", 1)[0].split("/", 1)[0]


def default_name(source: str) -> str:
    """Name for an adapter given without one: the registry model name, or the run folder's name."""
    if source.startswith("models:/"):
        spec = source[len("models:/"):]
        return spec.replace("@", "-").replace("/", "-")
    return Path(source).expanduser().resolve().name


def parse_adapter_arg(text: str) -> tuple[str, str]:
    """'NAME=RUN' or 'RUN' -> (name, source)."""
    name, sep, source = text.partition("=")
    if sep and not name.startswith("models:") and "/" not in name:
        return check_name(name), source
    return check_name(default_name(text)), text


def resolve_adapter(name: str, source: str, roots: list[Path] | None, tracking_uri: str | None = None,
                    registry: list[str] | None = None) -> AdapterSpec:
    """Validate a run folder (or registry URI) as a servable LoRA adapter.

    `roots` None: the operator named it on the command line, anywhere goes. Otherwise (an admin load) the run
    folder and its adapter/ (symlinks resolved) must lie inside `roots`, and a models:/ URI must name a
    registered model in `registry` ("*": any)."""
    try:
        return _resolve_adapter(name, source, roots, tracking_uri, registry)
    except (OSError, ValueError) as err:  # a path the file system refuses to look at
        raise ServeError(f"adapter path {source!r}: {err}") from None


def _resolve_adapter(name: str, source: str, roots: list[Path] | None, tracking_uri: str | None,
                     registry: list[str] | None) -> AdapterSpec:
    from tunelab.artifacts import RunPaths
    from tunelab.config_file import load_run_config
    from tunelab.models import resolve_model
    from tunelab.registry import resolve_run_dir

    check_name(name)
    check_path_text(source)
    if source.startswith("models:/"):
        if roots is not None and "*" not in (registry or []) and registry_name(source) not in (registry or []):
            raise ServeError(f"{source}: registered model '{registry_name(source)}' is not allowed; start the server "
                             f"with --allow-root models:/{registry_name(source)} (or models:/ for any)", 403,
                             "forbidden_path")
        run_dir = resolve_run_dir(source, tracking_uri)
    elif roots is None:
        run_dir = Path(source).expanduser().resolve()
    else:
        run_dir = inside_allowed_roots(Path(source), roots)
        # The folder is inside; what it links to must be too (RUN/adapter -> /elsewhere is refused), down to
        # the files the adapter is loaded from.
        inside = RunPaths(run_dir)
        adapter_files = sorted(inside.adapter.iterdir()) if inside.adapter.is_dir() else []
        for path in [inside.adapter, inside.config, inside.chat_template, *adapter_files]:
            if path.exists() or path.is_symlink():
                inside_allowed_roots(path, roots)
    run = RunPaths(run_dir)
    adapter_dir, config_file = run.adapter, run.adapter_config
    if not config_file.is_file():
        raise ServeError(f"{source}: no trained adapter (adapter/adapter_config.json); serve full fine-tunes with "
                         "--base RUN/model", status=404, code="adapter_not_found")
    adapter_config = json.loads(config_file.read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise ServeError(f"{source}: a {adapter_config.get('peft_type')} adapter; only LoRA adapters can share a "
                         "batch with others (merge it with `tunelab export merge` and serve it as --base)")
    if adapter_config.get("use_dora"):
        raise ServeError(f"{source}: a DoRA adapter; PEFT cannot batch DoRA with other adapters (merge it with "
                         "`tunelab export merge` and serve it as --base)")
    cfg, _ = load_run_config(run_dir)
    return AdapterSpec(
        name=name, run_dir=run_dir, source=source, adapter_dir=adapter_dir, base_folder=resolve_model(cfg.model),
        system_prompt=cfg.data.system_prompt, rank=int(adapter_config.get("r", 8)),
        chat_template=cfg.data.chat_template,
    )


def adapter_tokenizer(spec: AdapterSpec) -> Any:
    """The tokenizer the adapter's run trained with, ready to chat. A run trained on raw text (cpt on a base
    model) saved no template: it chats in its data.chat_template written as text, as eval and `tunelab chat` do."""
    from tunelab.artifacts import RunPaths
    from tunelab.chat import chat_tokenizer

    return chat_tokenizer(RunPaths(spec.run_dir).trained, spec.chat_template)


def check_same_base(spec: AdapterSpec, base_folder: Path | None) -> None:
    if base_folder is not None and spec.base_folder.resolve() != base_folder.resolve():
        raise ServeError(f"{spec.source}: trained on {spec.base_folder}, but this server's base is {base_folder}",
                         409, "base_mismatch")


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the only values vLLM's --max-lora-rank accepts


def vllm_max_lora_rank(ranks: dict[str, int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter (name: LoRA rank): vLLM refuses any
    other value, and refuses adapters above it."""
    too_big = {name: r for name, r in ranks.items() if r > VLLM_LORA_RANKS[-1]}
    if too_big:
        names = ", ".join(f"'{name}' (rank {r})" for name, r in too_big.items())
        raise ServeError(f"adapter {names}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; serve it with "
                         "--engine hf, or merge it (tunelab export merge) and vllm serve the merged folder")
    return next(r for r in VLLM_LORA_RANKS if r >= max(ranks.values(), default=0))
