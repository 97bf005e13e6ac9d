"""Deterministic train/val/test split, optionally stratified or grouped, and source weighting."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from tunelab.data.records import Record
from tunelab.errors import DataError


def _key(record: Record, column: str, option: str) -> str:
    if column not in record.meta:
        raise DataError(f"{record.source}: data.{option} column '{column}' is missing from row {record.id}")
    return str(record.meta[column])


def split_records(records: list[Record], val_fraction: float, test_fraction: float, seed: int,
                  stratify_by: str | None = None, group_by: str | None = None
                  ) -> tuple[list[Record], list[Record], list[Record]]:
    """(train, val, test). The same inputs and seed always give the same split."""
    rng = random.Random(seed)
    if group_by:
        return _split_groups(records, val_fraction, test_fraction, rng, group_by)
    strata: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        strata[_key(record, stratify_by, "stratify_by") if stratify_by else ""].append(record)
    names = sorted(strata)
    sizes = [len(strata[name]) for name in names]
    # Shares of the whole split's size, not each stratum rounded on its own (20 strata of 5 rows at 10% would
    # each round 0.5 down to nothing: no val or test at all).
    n_tests, n_vals = _shares(sizes, test_fraction), _shares(sizes, val_fraction)
    train, val, test = [], [], []
    for name, n_test, n_val in zip(names, n_tests, n_vals):
        rows = strata[name][:]
        rng.shuffle(rows)
        test += rows[:n_test]
        val += rows[n_test : n_test + n_val]
        train += rows[n_test + n_val :]
    for rows in (train, val, test):
        rng.shuffle(rows)
    return train, val, test


def _shares(sizes: list[int], fraction: float) -> list[int]:
    """round(sum(sizes) x fraction) rows shared out over the strata in proportion to their sizes (largest
    remainders get the rows left over; ties to the earlier stratum)."""
    exact = [size * fraction for size in sizes]
    shares = [int(x) for x in exact]
    left = round(sum(sizes) * fraction) - sum(shares)
    for i in sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))[:max(0, left)]:
        shares[i] += 1
    return [min(share, size) for share, size in zip(shares, sizes)]


def _split_groups(records: list[Record], val_fraction: float, test_fraction: float, rng: random.Random,
                  column: str) -> tuple[list[Record], list[Record], list[Record]]:
    """Whole groups go to one split, so no group (a user, a document) straddles train and eval."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[_key(record, column, "group_by")].append(record)
    names = sorted(groups)
    rng.shuffle(names)
    total = len(records)
    train, val, test = [], [], []
    for name in names:
        # A group joins test (then val) only where that brings the split nearer its target size: filling until
        # the target was reached let one large group overshoot it (60% in test for a 10% target).
        for split, target in ((test, test_fraction * total), (val, val_fraction * total)):
            if abs(len(split) + len(groups[name]) - target) < abs(len(split) - target):
                split += groups[name]
                break
        else:
            train += groups[name]
    return train, val, test


def apply_weights(records: list[Record], weight_of: Callable[[Record], float], seed: int) -> list[Record]:
    """Resample training rows by their source's weight: 2.0 repeats a source, 0.5 keeps half of it."""
    by_weight: dict[float, list[Record]] = defaultdict(list)
    for record in records:
        by_weight[weight_of(record)].append(record)
    if set(by_weight) <= {1.0}:
        return records
    rng = random.Random(seed)
    out: list[Record] = []
    for weight in sorted(by_weight):
        rows = by_weight[weight]
        whole, fraction = int(weight), weight - int(weight)
        for n in range(whole):
            out += rows if n == 0 else [replace(r, id=f"{r.id}#{n + 1}") for r in rows]
        sampled = rng.sample(rows, round(len(rows) * fraction))
        out += [replace(r, id=f"{r.id}#{whole + 1}") if whole else r for r in sampled]
    rng.shuffle(out)
    return out
