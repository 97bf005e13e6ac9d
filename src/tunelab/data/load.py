"""Read example files into normalized records, naming file, line and field for every bad row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import PARSERS, RowError, detect_format
from tunelab.errors import DataError


@dataclass
class Record:
    """One normalized example: a conversation ending in the assistant's answer."""

    id: str
    messages: list[dict[str, str]]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages, "source": self.source}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Record:
        return cls(id=row["id"], messages=row["messages"], source=row.get("source", ""))


def read_jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def load_records(path: Path, fmt: str = "auto") -> list[Record]:
    """Parse every row of a JSONL file in `fmt` (or auto-detected per row) into Records."""
    records = []
    for lineno, row in read_jsonl_rows(path):
        try:
            row_format = detect_format(row) if fmt == "auto" else fmt
            messages = PARSERS[row_format](row)
        except RowError as err:
            raise DataError(f"{path}:{lineno}: {err}") from None
        row_id = row.get("id")
        record_id = str(row_id) if row_id is not None else f"{path.stem}:{lineno}"
        records.append(Record(record_id, messages, f"{path.name}:{lineno}"))
    return records
