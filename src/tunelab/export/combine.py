"""`tunelab combine RUN_A RUN_B ... --how ... --out DIR`: LoRA adapters of one base blended into one.

The blend is PEFT's `add_weighted_adapter`. What its combination types need (PEFT 0.21):
- `linear`, `ties`, `dare_linear`, `dare_ties`: every adapter has the same rank r; the result has rank r.
  `linear` sums the A and B matrices separately, a rough approximation of summing the updates B·A.
- `cat`: any ranks; the result's rank is the sum, and it is exact (the weighted sum of the updates).
- `ties`, `dare_*`: `density`, the fraction of each update's entries kept (TIES trims by magnitude, DARE drops
  at random and rescales, so DARE is seeded here).
The new adapter folds each source's alpha/r scaling into its weights and has lora_alpha = r.

The result is a run folder like any other (config.yaml, adapter/, data/, manifest.json), so eval, chat,
export and serve take it. Its config evaluates the blend on every source run's test suites, with the source
runs as systems beside it: blends can surprise, and the report shows where.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import (
    RunPaths,
    atomic_dir,
    manifest,
    trained_weights_problem,
    write_json_atomic,
    write_text_atomic,
)
from tunelab.config import RunConfig, SuiteConfig
from tunelab.config_file import dump_config
from tunelab.errors import ExportError
from tunelab.models import Precision, load_model, load_tokenizer, locate_model, resolve_model
from tunelab.progress import console

HOW = {"linear": "linear", "cat": "cat", "ties": "ties", "dare": "dare_ties", "dare_ties": "dare_ties",
       "dare_linear": "dare_linear"}
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear")
NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear")


@dataclass
class Source:
    cfg: RunConfig
    run: RunPaths
    rank: int


def check_sources(sources: list[Source], how: str, weights: list[float], density: float | None) -> None:
    """Everything that can be refused without loading weights, one line each."""
    if how not in HOW:
        raise ExportError(f"--how: expected one of {', '.join(HOW)}, got {how!r}")
    if len(sources) < 2:
        raise ExportError("combine: give at least two run folders")
    if len(weights) != len(sources):
        raise ExportError(f"--weights: {len(weights)} weights for {len(sources)} runs")
    if HOW[how] in NEEDS_DENSITY and not (density is not None and 0 < density <= 1):
        raise ExportError(f"--density: {how} needs a density in (0, 1], the fraction of each update kept")
    first = sources[0]
    base = locate_model(first.cfg.model).path.resolve()
    template = _template(first.run)
    for s in sources:
        if s.cfg.method.type not in ("lora", "qlora"):
            raise ExportError(f"combine: {s.run.root} was trained with method '{s.cfg.method.type}'; "
                              "only LoRA adapters can be combined")
        if s.cfg.method.use_dora:
            raise ExportError(f"combine: {s.run.root} is a DoRA adapter; PEFT cannot combine DoRA magnitudes")
        if not s.run.has_adapter:
            raise ExportError(f"combine: {s.run.root} has no trained adapter")
        if problem := trained_weights_problem(s.run):
            raise ExportError(f"combine: {s.run.root}: its adapter cannot be loaded: {problem}")
        if s.cfg.data.system_prompt != first.cfg.data.system_prompt:
            raise ExportError(f"combine: {s.run.root} was trained with another data.system_prompt than "
                              f"{first.run.root}; a blend would be prompted unlike one of them")
        other = locate_model(s.cfg.model).path.resolve()
        if other != base:
            raise ExportError(f"combine: {s.run.root} was trained on {other}, {first.run.root} on {base}; "
                              "adapters combine only on the same base model")
        if _template(s.run) != template:
            raise ExportError(f"combine: {s.run.root} was trained with another chat template than "
                              f"{first.run.root}; a blend would be prompted unlike one of them")
    ranks = {s.rank for s in sources}
    if HOW[how] in SAME_RANK and len(ranks) > 1:
        raise ExportError(f"combine: --how {how} needs adapters of one rank, got ranks "
                          f"{', '.join(str(s.rank) for s in sources)}; use --how cat for mixed ranks")


def _template(run: RunPaths) -> str:
    path = run.adapter / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else load_tokenizer(run.adapter).chat_template


def load_source(cfg: RunConfig, run: RunPaths) -> Source:
    config = run.adapter_config
    spec = json.loads(config.read_text()) if config.is_file() else {}
    rank = max([spec.get("r", 0), *(spec.get("rank_pattern") or {}).values()])
    return Source(cfg, run, rank)


def combine_runs(sources: list[Source], how: str, weights: list[float], out: Path, density: float | None = None,
                 seed: int = 0) -> RunPaths:
    import torch
    from peft import PeftModel

    check_sources(sources, how, weights, density)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file; choose a new folder for the combined run")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out: {out} is not empty; choose a new folder for the combined run")
    first = sources[0]
    names = [f"source{i}" for i in range(len(sources))]
    console.print(f"Combining {len(sources)} adapters ({HOW[how]}, weights {weights}) ...")
    base = load_model(resolve_model(first.cfg.model), Precision("cpu", None, torch.float32))
    model = PeftModel.from_pretrained(base, first.run.adapter, adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:]):
        model.load_adapter(source.run.adapter, adapter_name=name)
    torch.manual_seed(seed)  # DARE drops entries at random
    options: dict[str, Any] = {"density": density} if HOW[how] in NEEDS_DENSITY else {}
    model.add_weighted_adapter(names, weights, "combined", combination_type=HOW[how], **options)
    for name in names:
        model.delete_adapter(name)
    run = RunPaths(out)
    with atomic_dir(out) as tmp:
        staged = RunPaths(tmp)
        model.save_pretrained(tmp / "saved")
        (tmp / "saved" / "combined").rename(staged.adapter)  # PEFT saves a non-default adapter in a subfolder
        shutil.rmtree(tmp / "saved")
        tokenizer = load_tokenizer(first.run.adapter)
        tokenizer.save_pretrained(staged.adapter)
        write_text_atomic(staged.adapter / "chat_template.jinja", _template(first.run))
        shutil.copytree(first.run.data, staged.data)
        cfg = combined_config(sources, out)
        write_text_atomic(staged.config, dump_config(cfg))
        write_json_atomic(staged.manifest, manifest(
            "run", combined={"how": HOW[how], "weights": weights, "density": density, "seed": seed,
                             "sources": [str(s.run.root.resolve()) for s in sources],
                             "rank": json.loads(staged.adapter_config.read_text())["r"]}))
    return run


def combined_config(sources: list[Source], out: Path) -> RunConfig:
    """Run A's config, evaluated on every source's test suites with the source runs alongside."""
    cfg = sources[0].cfg.model_copy(deep=True)
    cfg.output.dir = out
    suites, labels = [], set()
    for i, s in enumerate(sources):
        label = re.sub(r"[^A-Za-z0-9_]+", "_", s.run.root.name).strip("_") or "run"
        label = f"{label}_{i}" if label in labels else label
        labels.add(label)
        for suite in s.cfg.eval.suites:
            files = suite.files or [s.run.data.resolve() / "test.jsonl"]
            suites.append(SuiteConfig(**{**suite.model_dump(), "name": f"{label}_{suite.name}", "files": files}))
    cfg.eval.suites = suites
    cfg.eval.compare_runs = [s.run.root.resolve() for s in sources]
    cfg.eval.gate = []  # the sources' rules name their own suites; pass --set eval.gate=[...] to `tunelab eval`
    return cfg
