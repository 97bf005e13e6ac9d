"""From a config plus the command line's flags to a checked sweep plan: every trial's full config, validated.

Everything a user can get wrong is found here, before Ray starts or any trial trains: an unknown or unsweepable
key, an empty range, a value a trial config refuses, an objective or constraint no trial will measure, early
stopping without val loss. Each is one line naming the flag or config key.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunelab.config import TRL_OBJECTIVES, RunConfig, SweepConfig
from tunelab.config_file import validate_config
from tunelab.errors import ConfigError
from tunelab.sweep.goals import check_goals, direction
from tunelab.sweep.space import Distribution, Space, draw_trials, parse_flag, parse_spec, resolve_search

# Sections a trial may not vary: where it writes and tracks is the sweep's business, and trials run on Ray Tune.
UNSWEEPABLE = {"output": "each trial gets its own folder under the sweep's output.dir",
               "track": "every trial tracks to the sweep's MLflow store, as a child of one parent run",
               "sweep": "a sweep does not nest", "cluster": "trials run as Ray Tune trials; set the cluster once",
               "k8s": "it does not change what a trial trains"}
# Settings that change how trials are scheduled, not what they train: --resume may change them.
RUNTIME_KEYS = ("max_concurrent", "cpus_per_trial", "gpus_per_trial")


@dataclass
class Flags:
    """The sweep command's options; None / empty means "as the config says"."""

    params: list[str] = field(default_factory=list)
    samples: int | None = None
    search: str | None = None
    objective: str | None = None
    mode: str | None = None
    constraints: list[str] = field(default_factory=list)
    max_concurrent: int | None = None
    early_stopping: bool | None = None


@dataclass
class Trial:
    index: int
    name: str
    params: dict[str, Any]
    config: RunConfig


@dataclass
class SweepPlan:
    cfg: RunConfig  # the base config, its sweep section as resolved (config + flags)
    root: Path
    search: str
    space: Space
    trials: list[Trial]
    objective: str
    mode: str  # max or min
    constraints: list[str]
    early_stopping: bool
    grace_steps: int | None

    def spec(self) -> dict[str, Any]:
        """What the trials are and how they are judged: a resumed sweep must agree with it."""
        s = self.cfg.sweep
        return {"params": s.params, "search": self.search, "samples": s.samples, "seed": s.seed,
                "objective": self.objective, "mode": self.mode, "constraints": self.constraints,
                "early_stopping": self.early_stopping, "grace_steps": self.grace_steps,
                "reduction_factor": s.reduction_factor}


def merge_flags(cfg: RunConfig, flags: Flags) -> tuple[RunConfig, dict[str, str]]:
    """The config with the flags applied to its sweep section, and where each goal came from (for messages)."""
    cfg = cfg.model_copy(deep=True)
    s = cfg.sweep.model_dump()
    origin = {"objective": "sweep.objective", "constraints": "sweep.constraints", "params": "sweep.params"}
    for flag in flags.params:
        key, spec = parse_flag(flag)
        s["params"][key] = spec.describe() if isinstance(spec, Distribution) else spec
    for name in ("samples", "search", "objective", "mode", "max_concurrent", "early_stopping"):
        if getattr(flags, name) is not None:
            s[name] = getattr(flags, name)
    if flags.objective is not None:
        origin["objective"] = "--objective"
    if flags.constraints:
        s["constraints"], origin["constraints"] = list(flags.constraints), "--constraint"
    try:
        cfg.sweep = SweepConfig.model_validate(s)
    except ValidationError as err:
        raise ConfigError(f"sweep: {_first_error(err)}") from None
    return cfg, origin


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    ctx = first.get("ctx", {}).get("error")
    return str(ctx) if ctx else f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def build_plan(cfg: RunConfig, origin: dict[str, str], flag_keys: set[str]) -> SweepPlan:
    """Check the sweep section of `cfg` (flags already merged) and make every trial's config."""
    s = cfg.sweep
    where = {key: f"--param {key}" if key in flag_keys else f"sweep.params.{key}" for key in s.params}
    space: Space = {}
    problems = []
    for key, value in s.params.items():
        try:
            space[key] = parse_spec(key, value, where[key])
            _check_key(cfg, key, space[key], where[key])
        except ConfigError as err:
            problems += err.problems
    if cfg.track.register_as is not None:  # which trial would it be? the sweep picks a best one after all ended
        problems.append("track.register_as: a sweep registers no trial; once it ends, register the one you choose: "
                        "tunelab registry register SWEEP_DIR/TRIAL --name NAME")
    if problems:
        raise ConfigError(*problems)
    search, count = resolve_search(space, s.search, s.samples, "sweep")
    drawn = draw_trials(space, search, count, s.seed)
    root = Path(cfg.output.dir)
    trials = []
    for index, params in enumerate(drawn):
        name = trial_name(index, params)
        trials.append(Trial(index, name, params, trial_config(cfg, index, name, params, root)))
    if len({t.name for t in trials}) != len(trials):
        raise ConfigError("sweep: two trials would get the same folder name; give values that differ")
    configs = [t.config for t in trials]
    _check_runs(cfg, configs)
    check_goals(s.objective, s.constraints, configs, origin)
    early, grace = _early_stopping(cfg, configs)
    return SweepPlan(cfg, root, search, space, trials, s.objective, direction(s.objective, s.mode),
                     list(s.constraints), early, grace)


def _check_key(cfg: RunConfig, key: str, spec: list[Any] | Distribution, where: str) -> None:
    """An unknown key or a value of the wrong type fails exactly as `--set` would (with a did-you-mean); some
    sections may not vary. Rules across keys are checked per trial, where the other swept values are known."""
    section = key.split(".")[0]
    if section in UNSWEEPABLE:
        raise ConfigError(f"{where}: {section}.* cannot be swept: {UNSWEEPABLE[section]}")
    values = spec if isinstance(spec, list) else [spec.low, spec.high]
    for value in values:
        raw = cfg.model_dump(mode="json")
        set_key(raw, key, copy.deepcopy(value))
        try:
            validate_config(raw, source=where)
        except ConfigError as err:
            own = [p for p in err.problems if f"'{key}" in p or "unknown key" in p]
            if own:
                raise ConfigError(own[0]) from None


def trial_name(index: int, params: dict[str, Any]) -> str:
    """trial-003-learning_rate=0.0003-r=16: the index keeps order, the values say what it tried."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in params.items()]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "-".join([f"trial-{index:03d}", *parts]))
    return name[:96].rstrip("-_")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def trial_config(base: RunConfig, index: int, name: str, params: dict[str, Any], root: Path) -> RunConfig:
    """The base config with the trial's values, its own folder, and the sweep's tracking store."""
    from tunelab.track import tracking_uri

    raw = base.model_dump(mode="json")
    for key, value in params.items():
        set_key(raw, key, copy.deepcopy(value))
    raw["output"] = {"dir": str(root.resolve() / name), "overwrite": False}
    if base.track.enabled and not base.track.tracking_uri:
        # The default store sits beside the run folder; a trial's folder is one level deeper than the sweep's,
        # so name the sweep's store: parent and children must live in one place.
        raw["track"]["tracking_uri"] = tracking_uri(base)
    raw.pop("sweep", None)  # a trial is an ordinary run
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    return validate_config(raw, source=f"sweep trial {index} ({shown})")


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _check_runs(cfg: RunConfig, configs: list[RunConfig]) -> None:
    """What would fail in every trial: a missing model, a combination the train stage refuses."""
    from tunelab.models import locate_model
    from tunelab.preflight import check_compatibility

    if cfg.cluster.backend == "ray":
        raise ConfigError("cluster.backend: ray trains one run on several Ray workers; a sweep runs each trial as one "
                          "Ray Tune trial (sweep.cpus_per_trial, sweep.gpus_per_trial). Set cluster.backend: local "
                          "(cluster.ray_address still chooses the cluster)")
    device = "cpu" if cfg.sweep.gpus_per_trial == 0 else "cuda"  # where trials train is known once Ray is up
    sources: dict[str, Any] = {}
    problems: list[str] = []
    for c in configs:
        key = c.model.model_dump_json()  # the model may be one of the swept keys
        if key not in sources:
            sources[key] = locate_model(c.model)
        try:
            check_compatibility(c, device, sources[key])
        except ConfigError as err:
            problems += [p for p in err.problems if p not in problems]
    if problems:
        raise ConfigError(*problems)


def _early_stopping(cfg: RunConfig, configs: list[RunConfig]) -> tuple[bool, int | None]:
    s = cfg.sweep
    wanted = s.early_stopping if s.early_stopping is not None else cfg.train.eval_steps is not None
    if not wanted:
        return False, None
    problems = []
    if any(c.train.eval_steps is None for c in configs):
        problems.append("sweep.early_stopping: ASHA compares trials on val loss every train.eval_steps steps; set "
                        "train.eval_steps (e.g. --set train.eval_steps=20) or pass --no-early-stopping")
    if any(c.data.val_fraction == 0 for c in configs):
        problems.append("sweep.early_stopping: needs a val split for val loss; set data.val_fraction above 0")
    if cfg.objective.type in TRL_OBJECTIVES:
        problems.append(f"sweep.early_stopping: val loss is measured during training for objectives sft and cpt, "
                        f"not {cfg.objective.type}; pass --no-early-stopping")
    if problems:
        raise ConfigError(*problems)
    return True, s.grace_steps or min(c.train.eval_steps for c in configs)  # type: ignore[type-var]
