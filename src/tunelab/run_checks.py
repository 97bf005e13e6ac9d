"""What a run folder must satisfy before a stage writes into it: its inputs live outside it (tunelab rewrites
the folder), and a resume continues the very training its checkpoint belongs to."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.artifacts import RunPaths
from tunelab.config import RunConfig
from tunelab.errors import ConfigError, TrainingError


def check_resumable(cfg: RunConfig, run: RunPaths) -> None:
    """--resume needs a complete checkpoint: say so before any weights load, and why there may be none."""
    from tunelab.train.trainer import complete_checkpoints

    if not complete_checkpoints(run.checkpoints):
        every = cfg.train.save_steps
        why = f"one is saved every train.save_steps={every} steps" if every else "train.save_steps is null: none are saved"
        raise TrainingError(f"--resume: no complete checkpoint in {run.checkpoints} ({why}); train without --resume")
    changed = _training_changes(cfg, run)
    if changed:
        raise TrainingError(f"--resume: {run.root} started training with another config or data "
                            f"({'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); a checkpoint continues "
                            f"only the training it belongs to: resume with {run.config}, or train into another "
                            "output.dir")


# What a checkpoint's optimizer, scheduler and data order belong to; budgets, logging and the speed switches
# (padding_free, liger_kernel, ...) may change between a run and its resume.
_RESUME_MUST_MATCH = {"model": ("name", "revision"), "method": None, "objective": None,
                      "train": ("learning_rate", "lr_scheduler", "warmup_ratio", "batch_size",
                                "gradient_accumulation_steps", "weight_decay", "max_grad_norm", "seed",
                                "neftune_noise_alpha")}


def _training_changes(cfg: RunConfig, run: RunPaths) -> list[str]:
    """How `cfg` differs from the config the run folder started training with, where a resume cannot follow."""
    from tunelab.config_file import load_config

    if not run.config.is_file():
        return []
    stored = load_config(run.config, stored=True)
    changes = []
    for section, keys in _RESUME_MUST_MATCH.items():
        before, now = getattr(stored, section).model_dump(mode="json"), getattr(cfg, section).model_dump(mode="json")
        changes += [f"{section}.{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys or sorted({*before, *now})
                    if before.get(k) != now.get(k)]
    world = [c.cluster.num_workers if c.cluster.backend == "ray" else 1 for c in (stored, cfg)]
    if world[0] != world[1]:  # the global batch is batch_size x accumulation x workers, and each rank's data share
        changes.append(f"training processes (cluster.backend/num_workers): {world[0]} -> {world[1]}")
    if (run.data / "manifest.json").is_file() and not same_data(cfg, run):
        changes.append("the data (its sources or the data section)")
    return changes


def _input_files(cfg: RunConfig) -> list[tuple[str, Path]]:
    """Every local file a run reads, with the config key that names it."""
    files = [(f"data.{role}[{i}]", Path(s.path)) for role in ("train", "test")
             for i, s in enumerate(getattr(cfg.data, role)) if not isinstance(s, str)]
    files += [(f"eval.suites[{i}].files[{k}]", Path(f)) for i, suite in enumerate(cfg.eval.suites)
              for k, f in enumerate(suite.files)]
    files += [(f"eval.suites[{i}].json_schema", Path(suite.json_schema)) for i, suite in enumerate(cfg.eval.suites)
              if suite.json_schema is not None]
    files += [(f"data.contamination.benchmarks[{i}]", Path(b)) for i, b in enumerate(cfg.data.contamination.benchmarks)]
    template = cfg.data.chat_template
    if template is not None and template.endswith(".jinja"):
        files.append(("data.chat_template", Path(template)))
    return files


def check_inputs_outside(cfg: RunConfig, run: RunPaths) -> None:
    """A run folder is tunelab's to rewrite: data prep replaces its data/ and output.overwrite clears the rest. A
    source file kept inside it would be lost (replaced by its own split, or deleted with the old run), so one
    is refused before anything is read or written."""
    root = run.root.expanduser().resolve()
    for key, path in _input_files(cfg):
        resolved = path.expanduser().resolve()
        if resolved == root or root in resolved.parents:
            raise ConfigError(f"{key}: {path} lies inside output.dir {run.root}, which tunelab rewrites (data prep "
                              "replaces its data/, output.overwrite clears the folder); keep inputs outside the "
                              "run folder")


def same_data(cfg: RunConfig, run: RunPaths) -> bool:
    from tunelab.data.prepare import data_fingerprint

    stamp = run.data / "manifest.json"
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == data_fingerprint(cfg)
    except (OSError, ValueError):
        return False
