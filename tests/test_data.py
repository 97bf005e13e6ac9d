"""Loading and validating example files; the deterministic split; the Dataset folder."""

from __future__ import annotations

import json

import pytest

from tests.conftest import animal_rows, write_jsonl
from tunelab.config_file import validate_config
from tunelab.data.load import load_records
from tunelab.data.prepare import build_dataset, load_dataset, prepare_data
from tunelab.errors import DataError


def test_messages_and_alpaca_normalize_to_the_same_schema(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say yes", "output": "yes", "id": 7},
    ])
    records = load_records(path)
    assert [r.messages for r in records] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
        [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}],
    ]
    assert [r.id for r in records] == ["mixed:1", "mixed:2", "7"]


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "a"}', "invalid JSON"),
    ('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].role': unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].content': is empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}',
     "field 'messages[1].content': expected a string, got int"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "field 'messages[0].role': the last message must be"),
    ('{"instruction": "a", "output": ""}', "field 'output': is empty"),
    ('{"prompt": "a", "answer": "b"}', "cannot tell the format"),
    ('[1, 2]', "expected a JSON object per line, got list"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(animal_rows(1)[0])
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the bad row is on line 3 (blank lines count)
    with pytest.raises(DataError) as info:
        load_records(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3: ")
    assert message in problem


def test_non_utf8_and_empty_and_missing_files(tmp_path):
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not valid UTF-8"):
        load_records(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="the file has no rows"):
        load_records(empty)
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_explicit_format_is_enforced(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", animal_rows(2))
    with pytest.raises(DataError, match="a.jsonl:1: field 'instruction'"):
        load_records(path, "alpaca")


def _cfg(tmp_path, **data):
    return validate_config({"data": {"train": str(write_jsonl(tmp_path / "t.jsonl", animal_rows(100))), **data}})


def test_split_is_deterministic_and_disjoint(tmp_path):
    cfg = _cfg(tmp_path, val_fraction=0.1, test_fraction=0.2, seed=3)
    a, b = build_dataset(cfg.data), build_dataset(cfg.data)
    assert [r.id for r in a.train] == [r.id for r in b.train]
    assert a.counts() == {"train": 72, "val": 8, "test": 20}
    ids = [r.id for split in (a.train, a.val, a.test) for r in split]
    assert len(ids) == len(set(ids)) == 100
    other = build_dataset(_cfg(tmp_path, val_fraction=0.1, test_fraction=0.2, seed=4).data)
    assert [r.id for r in other.test] != [r.id for r in a.test]


def test_dataset_folder_round_trips_and_bad_data_leaves_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    folder = tmp_path / "out" / "data"
    written = prepare_data(cfg.data, folder)
    assert load_dataset(folder).counts() == written.counts()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"] == written.counts() and len(manifest["sources"][0]["sha256"]) == 64

    (tmp_path / "t.jsonl").write_text('{"broken": \n')
    with pytest.raises(DataError):
        prepare_data(cfg.data, tmp_path / "out2" / "data")
    out2 = tmp_path / "out2"
    assert not out2.exists() or list(out2.iterdir()) == []  # no partial or temporary folder left behind
