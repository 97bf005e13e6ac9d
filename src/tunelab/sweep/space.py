"""The search space: parse each swept key's values or distribution, and draw the list of trials.

The whole trial list is drawn before any trial runs (grid: every combination in a fixed order; random: seeded
draws). Drawing up front is what lets a killed sweep resume exactly: the list is written to sweep.json, and the
same trials, with the same values, are what `--resume` finishes.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import yaml

from tunelab.errors import ConfigError

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
KINDS = ("loguniform", "uniform", "randint")
_DISTRIBUTION = re.compile(rf"^\s*({'|'.join(KINDS)})\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*$")
DEFAULT_SAMPLES = 10


@dataclass(frozen=True)
class Distribution:
    """A range to draw from: loguniform and uniform give floats, randint integers (both ends included)."""

    kind: str
    low: float
    high: float

    def sample(self, rng: random.Random) -> float | int:
        if self.kind == "randint":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "loguniform":
            return float(f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.6g}")
        return float(f"{rng.uniform(self.low, self.high):.6g}")

    def describe(self) -> str:
        low, high = (int(self.low), int(self.high)) if self.kind == "randint" else (self.low, self.high)
        return f"{self.kind}({low:g}, {high:g})"


Space = dict[str, "list[Any] | Distribution"]


def parse_spec(key: str, value: Any, where: str) -> list[Any] | Distribution:
    """One key's search values from the config (a list, or a distribution written as a string)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: empty list of values; give at least one value to try")
        seen: list[Any] = []
        for item in value:
            item = _scalar(item) if isinstance(item, str) and re.fullmatch(_NUMBER, item.strip()) else item
            if item in seen:
                raise ConfigError(f"{where}: the value {item!r} is listed twice")
            seen.append(item)
        return seen
    if isinstance(value, str):
        return _distribution(value, where)
    raise ConfigError(f"{where}: expected a list of values or a distribution such as 'loguniform(1e-5, 1e-3)', "
                      f"got {value!r}")


def parse_flag(flag: str) -> tuple[str, list[Any] | Distribution]:
    """`--param KEY=v1,v2,...` or `--param KEY=loguniform(a,b)`: values are read as YAML, like --set."""
    key, sep, text = flag.partition("=")
    key = key.strip()
    where = f"--param {key or flag}"
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--param {flag!r}: expected KEY=v1,v2,... or KEY=loguniform(a,b), e.g. "
                          "train.learning_rate=1e-4,3e-4")
    if not text.strip():
        raise ConfigError(f"{where}: no values given; write e.g. {key}=1e-4,3e-4 or {key}=loguniform(1e-5,1e-3)")
    if re.match(r"^\s*[a-z_]+\s*\(", text):
        return key, _distribution(text, where)
    values = []
    for part in _split_top_level(text):
        if not part.strip():
            raise ConfigError(f"{where}: an empty value in {text!r} (two commas in a row?)")
        values.append(_scalar(part))
    return key, parse_spec(key, values, where)


def _scalar(text: str) -> Any:
    """A value as YAML reads it, except that 1e-4 is a number (YAML 1.1 wants 1.0e-4 and would give a string)."""
    if re.fullmatch(rf"\s*{_NUMBER}\s*", text):
        number = float(text)
        return int(number) if re.fullmatch(r"\s*[-+]?\d+\s*", text) else number
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes, so a value may itself be a list: [q_proj,v_proj]."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current]


def _distribution(text: str, where: str) -> Distribution:
    match = _DISTRIBUTION.match(text)
    if not match:
        raise ConfigError(f"{where}: cannot read {text!r}; write a list of values or one of "
                          f"{', '.join(f'{k}(LOW, HIGH)' for k in KINDS)}")
    kind, low, high = match.group(1), float(match.group(2)), float(match.group(3))
    if kind == "randint" and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: randint takes whole numbers, got {text.strip()!r}")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: empty range {text.strip()!r}; LOW must be below HIGH")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs LOW above 0, got {text.strip()!r}")
    return Distribution(kind, low, high)


def resolve_search(space: Space, search: str, samples: int | None, where: str) -> tuple[str, int]:
    """(grid or random, number of trials), refusing combinations that cannot mean what they say."""
    if not space:
        raise ConfigError(f"{where}: nothing to sweep; add --param KEY=v1,v2 or a sweep.params section")
    lists = {k: v for k, v in space.items() if isinstance(v, list)}
    if search == "auto":
        search = "grid" if len(lists) == len(space) else "random"
    if search == "grid":
        if len(lists) != len(space):
            ranged = next(k for k in space if k not in lists)
            raise ConfigError(f"{where}: a grid needs a list of values for every key, and {ranged} is a range; "
                              "use random search (sweep.search: random, --search random)")
        if samples is not None:
            raise ConfigError(f"{where}: samples (--samples) applies to random search; this grid runs every one of its "
                              f"{math.prod(len(v) for v in lists.values())} combinations once (pass --search random "
                              "to draw from the lists instead)")
        return "grid", math.prod(len(v) for v in lists.values())
    count = samples or DEFAULT_SAMPLES
    if len(lists) == len(space) and count > math.prod(len(v) for v in lists.values()):
        raise ConfigError(f"{where}: --samples {count} is more than the {math.prod(len(v) for v in lists.values())} "
                          "distinct combinations of these lists; run the grid instead (--search grid)")
    return "random", count


def draw_trials(space: Space, search: str, count: int, seed: int) -> list[dict[str, Any]]:
    """The parameter values of every trial, in the order they will be run."""
    keys = list(space)
    if search == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]  # type: ignore[misc]
    rng = random.Random(seed)
    if all(isinstance(space[k], list) for k in keys):  # random over lists only: distinct combinations
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]  # type: ignore[misc]
        return rng.sample(grid, count)
    trials: list[dict[str, Any]] = []
    for _ in range(count):
        trials.append({k: rng.choice(v) if isinstance(v, list) else v.sample(rng) for k, v in space.items()})
    return trials


def describe_space(space: Space) -> dict[str, str]:
    return {k: v.describe() if isinstance(v, Distribution) else ", ".join(map(str, v)) for k, v in space.items()}
