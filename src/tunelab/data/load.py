"""Read a source (any supported file, any format, optional column mapping) into Records.

A bad row is an error naming file, line/row and field; with `on_error: skip` it is counted and reported
instead, so one broken line does not cost a 100k-row dataset.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.formats import FORMATS, detect_format, parse_row
from tunelab.data.readers import BadRow, read_hub_rows, read_rows
from tunelab.data.records import Record
from tunelab.errors import DataError, RowError
from tunelab.hub import dataset_label, is_hub_dataset

# Columns each format reads; other scalar columns are kept as `meta` (for stratify_by / group_by).
COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"), "text": ("text",),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"), "preference": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"), "text": ("text",),
}
TABLES = (".csv", ".parquet")


@dataclass
class Skipped:
    where: str
    problem: str


@dataclass
class Loaded:
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def load_source(path: Path | str, fmt: str = "auto", columns: dict[str, str] | None = None,
                on_error: str = "fail", split: str = "train", subset: str | None = None) -> Loaded:
    """Parse every row of `path` (a local file or folder, or hf://ORG/NAME with its `split` and `subset`).
    `columns` maps our field names to the source's (e.g. output: answer)."""
    hub = is_hub_dataset(path)
    label = dataset_label(str(path), split, subset) if hub else str(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{label}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    rename = {theirs: ours for ours, theirs in (columns or {}).items()}
    # Row ids when rows carry none: "train.jsonl:12", or "orders:test:3" for row 3 of a Hub dataset's test split.
    name = f"{str(path).rsplit('/', 1)[-1]}:{split}" if hub else Path(path).name
    rows = read_hub_rows(str(path), split, subset) if hub else read_rows(Path(path))
    out = Loaded()
    for n, (where, raw) in enumerate(rows):
        if isinstance(raw, BadRow):
            if on_error != "skip":
                raise DataError(f"{where}: {raw}")
            out.skipped.append(Skipped(where, str(raw)))
            continue
        row = {rename.get(k, k): v for k, v in raw.items()}
        if n == 0 and fmt != "auto" and (hub or Path(path).is_dir() or Path(path).suffix.lower() in TABLES):
            _check_columns(label, row, fmt, columns or {})
        try:
            row_format = detect_format(row) if fmt == "auto" else fmt
            record = parse_row(row, row_format, _record_id(row, name, label, where), where)
        except RowError as err:
            if on_error == "skip":
                out.skipped.append(Skipped(where, str(err)))
                continue
            raise DataError(f"{where}: {err}") from None
        record.meta = _meta(row, row_format)
        out.records.append(record)
    return out


def _check_columns(label: str, row: dict[str, Any], fmt: str, columns: dict[str, str]) -> None:
    for needed in REQUIRED[fmt]:
        if needed not in row:
            shown = columns.get(needed, needed)
            raise DataError(f"{label}: missing column '{shown}' needed by format {fmt} "
                            f"(columns: {', '.join(sorted(row))}); map yours with `columns:`")


def _record_id(row: dict[str, Any], name: str, label: str, where: str) -> str:
    if row.get("id") is not None:
        return str(row["id"])
    # "train.jsonl:12" / "data.csv row 7" -> a stable id from the source's name and position
    return f"{name}:{where[len(label):].strip(': ').replace('row ', '').replace('item ', '')}"


def _meta(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    used = set(COLUMNS[fmt]) | {"id"}
    # A NaN is how Parquet and pandas write a missing number: absent, like a null (and JSON has no NaN to write)
    return {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))
            and not (isinstance(v, float) and not math.isfinite(v))}


def load_records(path: Path, fmt: str = "auto") -> list[Record]:
    """All rows of one file, failing on the first bad one."""
    return load_source(path, fmt).records
