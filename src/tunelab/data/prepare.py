"""The data stage: source files -> a Dataset folder (train/val/test JSONL + manifest).

The split is deterministic by seed. Output is written to a temporary folder and renamed into place,
so a bad row anywhere leaves no partial Dataset folder behind.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tunelab.artifacts import atomic_dir, manifest, sha256_file, write_json_atomic, write_jsonl_atomic
from tunelab.config import DataConfig
from tunelab.data.load import Record, load_records
from tunelab.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    train: list[Record]
    val: list[Record]
    test: list[Record]

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}


def build_dataset(cfg: DataConfig) -> Dataset:
    """Load and validate every source file, then split."""
    pool = [r for path in cfg.train for r in load_records(path, cfg.format)]
    test = [r for path in cfg.test for r in load_records(path, cfg.format)]
    order = list(range(len(pool)))
    random.Random(cfg.seed).shuffle(order)
    pool = [pool[i] for i in order]
    if not cfg.test:
        n_test = round(len(pool) * cfg.test_fraction)
        test, pool = pool[:n_test], pool[n_test:]
    n_val = round(len(pool) * cfg.val_fraction)
    val, train = pool[:n_val], pool[n_val:]
    if not train:
        raise DataError(f"data.train: no training examples left after holding out val/test from {len(order)} rows")
    return Dataset(train=train, val=val, test=test)


def prepare_data(cfg: DataConfig, folder: Path) -> Dataset:
    """Write the Dataset folder for `cfg` at `folder` and return the split records."""
    dataset = build_dataset(cfg)
    with atomic_dir(folder) as tmp:
        for name in SPLITS:
            write_jsonl_atomic(tmp / f"{name}.jsonl", [r.to_json() for r in getattr(dataset, name)])
        sources = [{"path": str(p), "sha256": sha256_file(p)} for p in [*cfg.train, *cfg.test]]
        write_json_atomic(
            tmp / "manifest.json",
            manifest("dataset", sources=sources, counts=dataset.counts(), config=cfg.model_dump(mode="json")),
        )
    return dataset


def load_dataset(folder: Path) -> Dataset:
    """Read a Dataset folder written by `prepare_data`."""
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{folder}: not a prepared Dataset folder ({path.name} is missing)")
        with open(path, encoding="utf-8") as f:
            splits[name] = [Record.from_json(json.loads(line)) for line in f if line.strip()]
    return Dataset(**splits)
