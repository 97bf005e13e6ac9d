"""File readers: each yields (where, row) pairs, `where` being what an error message should name.

JSONL and JSON name lines ("train.jsonl:12"); tables name rows ("data.csv row 7", counting the header as
row 1 as a spreadsheet does; "data.parquet row 3"). Bad bytes and bad syntax are errors naming the place.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import DataError, NotData

Row = dict[str, Any]


class BadRow(str):
    """A row that cannot be read (broken JSON, bad bytes): yielded in place of the row, so the loader
    decides between failing and skipping, as it does for rows that read but do not validate."""


def read_rows(path: Path) -> Iterator[tuple[str, Row | BadRow]]:
    """Rows of any supported source, by file type; raises DataError when the whole file is unusable."""
    if path.is_dir():
        yield from _read_hf_folder(path)
        return
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv, .parquet or a "
                        "datasets folder (save_to_disk)")
    count = 0
    for item in readers[suffix](path):
        count += 1
        yield item
    if count == 0:
        raise DataError(f"{path}: the file has no rows")


def _utf8_problem(path: Path, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {err.start}); re-save {path.name} as UTF-8"


# csv's default field limit is 128 KiB, below a long document; 16 MiB holds any sane cell and still stops a
# file that is one runaway quoted field.
CSV_FIELD_LIMIT = 16 << 20
# json accepts any nesting (until Python's recursion limit): a row is a few levels deep.
MAX_ROW_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_ROW_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _decode_problem(err: json.JSONDecodeError) -> str:
    """'Unterminated string starting at column 130': json's messages often end in 'at' already."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def _loads(text: str) -> Any:
    """json.loads, with what it raises for hostile input (runaway nesting, integers over Python's digit
    limit) turned into JSONDecodeError-like ValueErrors with a readable message."""
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except (json.JSONDecodeError, NotData):
        raise
    except RecursionError:
        raise ValueError(f"nested more than {MAX_ROW_DEPTH} levels deep") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"a number too long to read ({str(err).split(';')[0]})") from None
    if _depth(value) > MAX_ROW_DEPTH:
        raise ValueError(f"nested more than {MAX_ROW_DEPTH} levels deep")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is refused (json would silently keep the last, e.g. the wrong answer)."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise NotData(f"key {twice[:80]!r} appears twice in one object")
    return row


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; Python's json reads them and writes them back as invalid JSON."""
    raise NotData(f"{name} is not a JSON value (write null or a number)")


def _decode(raw: bytes) -> str:
    """A whole-file format's text. Bytes that are not UTF-8 become lone surrogates, so the rows holding them are
    bad rows (named, skipped with on_error: skip) rather than one bad byte failing every row of the file."""
    return raw.decode("utf-8-sig", errors="surrogateescape")


def _not_utf8(row: Any, path: Path) -> BadRow | None:
    """A BadRow when `row` holds bytes `_decode` could not read as UTF-8."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return BadRow(f"not valid UTF-8 (bytes that are not UTF-8, or a lone \\ud800-\\udfff escape); re-save "
                      f"{path.name} as UTF-8 text")
    return None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Row | BadRow]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark opens some files
            except UnicodeDecodeError as err:
                yield where, BadRow(_utf8_problem(path, err))
                continue
            if not line.strip():
                continue
            try:
                row = _loads(line.rstrip("\r\n"))  # a line cut short is an unterminated string, not a control character
            except json.JSONDecodeError as err:
                yield where, BadRow(f"invalid JSON: {_decode_problem(err)}")
                continue
            except ValueError as err:
                yield where, BadRow(f"invalid JSON: {err}")
                continue
            if not isinstance(row, dict):
                yield where, BadRow(f"expected a JSON object per line, got {type(row).__name__}")
                continue
            yield where, _not_utf8(row, path) or row


def _read_json(path: Path) -> Iterator[tuple[str, Row | BadRow]]:
    text = _decode(path.read_bytes())
    try:
        data = _loads(text)
    except json.JSONDecodeError as err:
        # Many ".json" files are really JSON Lines; read them as such rather than failing.
        if err.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {_decode_problem(err)}") from None
    except NotData as err:
        if not text.lstrip().startswith("["):
            raise DataError(f"{path}: invalid JSON: {err}") from None
        yield from _array_items(path, text)  # the item that holds it, named and skippable like any bad row
        return
    except ValueError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects (or an object holding one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            yield f"{path} item {i}", BadRow(f"expected an object, got {type(row).__name__}")
            continue
        yield f"{path} item {i}", _not_utf8(row, path) or row


def _array_items(path: Path, text: str) -> Iterator[tuple[str, Row | BadRow]]:
    """The items of `text`, a JSON array that parses but holds something that cannot be data (a NaN, a key
    given twice), read one at a time so that each such item is a bad row of its own."""
    strict = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_no_constant)
    space = re.compile(r"[ \t\n\r]*,?[ \t\n\r]*")
    at = space.match(text, text.index("[") + 1).end()
    for i in itertools.count(1):
        if text.startswith("]", at):
            return
        try:
            row, end = strict.raw_decode(text, at)
        except NotData as err:
            yield f"{path} item {i}", BadRow(f"invalid JSON: {err}")
            _, end = json.JSONDecoder().raw_decode(text, at)  # the whole text parsed without the hooks
        else:
            yield f"{path} item {i}", (_not_utf8(row, path) or row if isinstance(row, dict)
                                       else BadRow(f"expected an object, got {type(row).__name__}"))
        at = space.match(text, end).end()


def _read_csv(path: Path) -> Iterator[tuple[str, Row | BadRow]]:
    text = _decode(path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""))
    rowno = 0  # the last row read; a broken one is the next
    try:
        header = next(reader, None)
        if not header:
            return
        if _not_utf8(header, path):  # every row's keys: the file, not a row, is unreadable
            raise DataError(f"{path} row 1: the header is not valid UTF-8; re-save {path.name} as UTF-8")
        if len(set(header)) < len(header):
            seen: set[str] = set()
            twice = next(name for name in header if name in seen or seen.add(name))
            raise DataError(f"{path} row 1: column {twice[:80]!r} appears twice in the header; rename one")
        rowno = 1
        for rowno, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield f"{path} row {rowno}", BadRow(f"has {len(values)} fields but the header has {len(header)}")
                continue
            row = {k: _csv_value(v) for k, v in zip(header, values)}
            yield f"{path} row {rowno}", _not_utf8(row, path) or row
    except csv.Error as err:
        # The reader cannot go on past a broken row (a field over the limit): name that row and stop.
        if "field larger" in str(err):
            raise DataError(f"{path} row {rowno + 1}: a field is longer than {CSV_FIELD_LIMIT >> 20} MiB; split the "
                            "text or use JSONL") from None
        raise DataError(f"{path} row {rowno + 1}: unreadable CSV: {err}") from None


def _csv_value(value: str) -> Any:
    """CSV cells are strings; JSON-looking cells (message lists) are decoded so chat columns work too."""
    stripped = value.strip()
    if stripped[:1] in "[{":
        try:
            return _loads(stripped)
        except ValueError:
            return value
    return value


def _read_parquet(path: Path) -> Iterator[tuple[str, Row]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet: {err}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {i}", row


def read_hub_rows(path: str, split: str, subset: str | None) -> Iterator[tuple[str, Row]]:
    """Rows of a Hub dataset (hf://ORG/NAME), named like table rows: "hf://org/name split train row 7"."""
    from tunelab.hub import dataset_label, load_hub_dataset

    label = dataset_label(path, split, subset)
    data = load_hub_dataset(path, split, subset)
    if len(data) == 0:
        raise DataError(f"{label}: the dataset has no rows")
    for i, row in enumerate(data, start=1):
        yield f"{label} row {i}", dict(row)


def _read_hf_folder(path: Path) -> Iterator[tuple[str, Row]]:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path}: a folder source must be a datasets folder written by save_to_disk")
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many types for a damaged folder
        problem = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot read the datasets folder (save_to_disk): {problem}") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict source needs a 'train' split (has {', '.join(data)})")
        data = data["train"]
    if len(data) == 0:
        raise DataError(f"{path}: the dataset has no rows")
    for i, row in enumerate(data, start=1):
        yield f"{path} row {i}", dict(row)
