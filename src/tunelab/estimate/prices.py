"""Accelerators tunelab estimate knows: memory, dense bf16 throughput, and an hourly price.

Prices are indicative on-demand list prices for one GPU (USD per hour), as published by large and
specialized clouds, compiled for tunelab in 2026-11; they were not checked live and vary by provider and
region. Pass `--price-per-hour`, or `--prices FILE` (YAML mapping NAME: {memory_gib, bf16_tflops,
usd_per_hour}) to use your own. Throughput is the vendor's dense (no sparsity) bf16 figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ConfigError

PRICES_DATE = "2026-11"
PRICES_SOURCE = "indicative on-demand list prices of public clouds, per GPU (not live-checked)"


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    usd_per_hour: float


GPUS: dict[str, Accelerator] = {g.name.lower(): g for g in (
    Accelerator("H200", 141, 989, 3.80),
    Accelerator("H100", 80, 989, 2.99),
    Accelerator("A100-80G", 80, 312, 1.79),
    Accelerator("A100-40G", 40, 312, 1.29),
    Accelerator("L40S", 48, 362, 1.04),
    Accelerator("A10G", 24, 125, 1.01),
    Accelerator("L4", 24, 121, 0.80),
    Accelerator("T4", 16, 65, 0.35),  # no bf16: the figure is fp16
)}

# This machine when no GPU is named: a small general-purpose instance of 2 vCPUs.
CPU_USD_PER_HOUR = 0.10


def load_table(path: Path | None) -> dict[str, Accelerator]:
    """The built-in table, with the entries of a user's YAML file added or replacing ours."""
    if path is None:
        return dict(GPUS)
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--prices: cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--prices: {path}: expected a mapping NAME: {{memory_gib, bf16_tflops, usd_per_hour}}")
    table = dict(GPUS)
    for name, entry in raw.items():
        try:
            table[str(name).lower()] = Accelerator(str(name), float(entry["memory_gib"]), float(entry["bf16_tflops"]),
                                                   float(entry["usd_per_hour"]))
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"--prices: {path}: entry {name!r} needs numbers memory_gib, bf16_tflops and "
                              "usd_per_hour") from None
    return table


def find_gpu(name: str, table: dict[str, Accelerator]) -> Accelerator:
    found = table.get(name.lower())
    if found is None:
        known = ", ".join(g.name for g in table.values())
        raise ConfigError(f"--gpu: unknown accelerator {name!r}; known: {known} (add one with --prices FILE)")
    return found
