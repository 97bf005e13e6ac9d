"""Read a source (any supported file, any format, optional column mapping) into Records.

A bad row is an error naming file, line/row and field; with `on_error: skip` it is counted and reported
instead, so one broken line does not cost a 100k-row dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.formats import FORMATS, RowError, detect_format, parse_row
from tunelab.data.readers import BadRow, read_rows
from tunelab.data.records import Record
from tunelab.errors import DataError

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


def load_source(path: Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                on_error: str = "fail") -> Loaded:
    """Parse every row of `path`. `columns` maps our field names to the file's (e.g. output: answer)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    rename = {theirs: ours for ours, theirs in (columns or {}).items()}
    out = Loaded()
    for n, (where, raw) in enumerate(read_rows(path)):
        if isinstance(raw, BadRow):
            if on_error != "skip":
                raise DataError(f"{where}: {raw}")
            out.skipped.append(Skipped(where, str(raw)))
            continue
        row = {rename.get(k, k): v for k, v in raw.items()}
        if n == 0 and fmt != "auto" and (path.is_dir() or path.suffix.lower() in TABLES):
            _check_columns(path, row, fmt, columns or {})
        try:
            row_format = detect_format(row) if fmt == "auto" else fmt
            record = parse_row(row, row_format, _record_id(row, path, where), where)
        except RowError as err:
            if on_error == "skip":
                out.skipped.append(Skipped(where, str(err)))
                continue
            raise DataError(f"{where}: {err}") from None
        record.meta = _meta(row, row_format)
        out.records.append(record)
    return out


def _check_columns(path: Path, row: dict[str, Any], fmt: str, columns: dict[str, str]) -> None:
    for needed in REQUIRED[fmt]:
        if needed not in row:
            shown = columns.get(needed, needed)
            raise DataError(f"{path}: missing column '{shown}' needed by format {fmt} "
                            f"(columns: {', '.join(sorted(row))}); map yours with `columns:`")


def _record_id(row: dict[str, Any], path: Path, where: str) -> str:
    if row.get("id") is not None:
        return str(row["id"])
    # "train.jsonl:12" / "data.csv row 7" -> a stable id from the file name and position
    return f"{path.name}:{where[len(str(path)):].strip(': ').replace('row ', '').replace('item ', '')}"


def _meta(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    used = set(COLUMNS[fmt]) | {"id"}
    return {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}


def load_records(path: Path, fmt: str = "auto") -> list[Record]:
    """All rows of one file, failing on the first bad one."""
    return load_source(path, fmt).records
