"""Loaders (JSONL, JSON, CSV, Parquet, datasets folder), formats, column mapping, and bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import animal_rows, write_jsonl
from tunelab.data.load import load_records, load_source
from tunelab.errors import DataError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_every_format_normalizes(tmp_path):
    rows = [
        {"messages": CHAT},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Hi", "output": "Hello"},
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
    ]
    records = load_records(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert all(r.kind == "chat" and r.messages == CHAT for r in records)
    assert [r.id for r in records] == [f"chat.jsonl:{i}" for i in range(1, 6)]


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    (record,) = load_records(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "chat",
                                                                   "output": "cat", "id": 7}]))
    assert record.messages[0] == {"role": "user", "content": "Translate\n\nchat"} and record.id == "7"


def test_preference_rows_as_strings_and_as_conversations(tmp_path):
    rows = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]},
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ]
    for record in load_records(write_jsonl(tmp_path / "p.jsonl", rows)):
        assert record.kind == "preference"
        assert (record.messages, record.chosen, record.rejected) == ([{"role": "user", "content": "Q?"}], "good", "bad")


def test_kto_and_text_rows(tmp_path):
    kto = load_records(write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Q?", "completion": "A", "label": False}]))
    assert (kto[0].kind, kto[0].completion, kto[0].label) == ("kto", "A", False)
    text = load_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert (text[0].kind, text[0].text) == ("text", "Once upon a time.")


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "a"}', "invalid JSON"),
    # a line cut short inside a string: json's message ends in "at"; the line's newline is not the problem
    ('{"messages": [{"role": "user", "content": "a', "invalid JSON: Unterminated string starting at column 43"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].content': is missing"),
    ('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].role': unknown role 'bot'"),
    ('{"conversations": [{"from": "robot", "value": "a"}]}', "field 'conversations[0].from': unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].content': is empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}',
     "field 'messages[1].content': expected a string, got int"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "field 'messages[0].role': the last message must be"),
    ('{"instruction": "a", "output": ""}', "field 'output': is empty"),
    ('{"prompt": "q", "chosen": "same", "rejected": " same "}', "field 'rejected': is identical to 'chosen'"),
    ('{"prompt": "q", "completion": "a", "label": "maybe"}', "field 'label': expected true or false"),
    ('{"question": "a", "answer": "b"}', "cannot tell the format from its keys (answer, question); set data.format"),
    ('{"instruction": "a", "input": "b"}', "cannot tell the format from its keys (input, instruction): as alpaca it "
     "lacks output"),
    ('{"prompt": "a", "completion": 3}', "field 'completion': expected a string or a list of {role, content} "
     "messages, got int"),
    ('{"prompt": null, "completion": "b"}', "field 'prompt': is missing"),
    ('[1, 2]', "expected a JSON object per line, got list"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, '
     '{"role": "assistant", "content": "b"}]}', "field 'messages[0].content[0]': a image_url part; tunelab trains"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": [{}]}, '
     '{"role": "tool", "content": "7"}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[1]': a tool call or tool result"),
    ('{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].weight': only assistant messages take a weight"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]}',
     "field 'messages[1].weight': expected 0 (not trained on) or 1, got 0.5"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}',
     "field 'messages': every assistant message has weight 0: nothing to train on"),
]


def test_openai_rows_content_parts_and_weights(tmp_path):
    """OpenAI's chat fine-tuning rows: text parts are joined one per line; weight 0 keeps a turn out of the loss."""
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Name an animal."}, {"type": "text", "text": "One."}]},
        {"role": "assistant", "content": "answer: cat", "weight": 0},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "answer: owl", "weight": 1}]}
    (record,) = load_records(write_jsonl(tmp_path / "openai.jsonl", [row]))
    assert record.messages[0] == {"role": "user", "content": "Name an animal.\nOne."}
    assert record.messages[1] == {"role": "assistant", "content": "answer: cat", "weight": 0}
    assert record.messages[3] == {"role": "assistant", "content": "answer: owl"}


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


def test_skip_mode_counts_bad_rows_instead(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(animal_rows(1)[0])
    path.write_text(f"{good}\n{{broken\n{good}\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    loaded = load_source(path, on_error="skip")
    assert len(loaded.records) == 2
    assert [s.where for s in loaded.skipped] == [f"{path}:2", f"{path}:4"]
    assert "invalid JSON" in loaded.skipped[0].problem and "unknown role 'bot'" in loaded.skipped[1].problem


def test_non_utf8_empty_and_missing_files(tmp_path):
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"instruction": "a", "output": "x"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_records(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no rows"):
        load_records(empty)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(tmp_path / "x.txt")


def test_a_nan_or_a_repeated_key_in_a_json_array_is_one_bad_item(tmp_path):
    """Before: the whole file failed with "invalid JSON: NaN is not a JSON value" and no item named."""
    path = tmp_path / "arr.json"
    path.write_text('[\n {"instruction": "a", "output": "1"},\n {"instruction": "b", "output": NaN},\n'
                    ' {"instruction": "c", "instruction": "d", "output": "3"} , {"instruction": "e", "output": "4"}\n]')
    with pytest.raises(DataError, match=r"arr.json item 2: invalid JSON: NaN is not a JSON value \(write null or a "
                                        r"number\)"):
        load_records(path)
    loaded = load_source(path, on_error="skip")
    assert [r.messages[0]["content"] for r in loaded.records] == ["a", "e"]
    assert [(s.where, s.problem) for s in loaded.skipped] == [
        (f"{path} item 2", "invalid JSON: NaN is not a JSON value (write null or a number)"),
        (f"{path} item 3", "invalid JSON: key 'instruction' appears twice in one object")]
    path.write_text('{"rows": [{"instruction": "a", "output": NaN}]}')  # inside a wrapper: the file, as before
    with pytest.raises(DataError, match=r"arr.json: invalid JSON: NaN is not a JSON value"):
        load_records(path)


def test_a_non_utf8_byte_in_a_csv_or_json_file_is_one_bad_row(tmp_path):
    csv_file = tmp_path / "latin1.csv"
    csv_file.write_bytes(b"instruction,output\nfirst,x\ncaf\xe9,y\nlast,z\n")
    loaded = load_source(csv_file, on_error="skip")
    assert [r.messages[0]["content"] for r in loaded.records] == ["first", "last"]
    assert [(s.where, s.problem) for s in loaded.skipped] == [
        (f"{csv_file} row 3", "not valid UTF-8 (bytes that are not UTF-8, or a lone \\ud800-\\udfff escape); re-save "
                              "latin1.csv as UTF-8 text")]
    with pytest.raises(DataError, match=r"latin1.csv row 3: not valid UTF-8"):
        load_records(csv_file)
    json_file = tmp_path / "latin1.json"
    json_file.write_bytes(b'[{"instruction": "a", "output": "x"}, {"instruction": "caf\xe9", "output": "y"}]')
    loaded = load_source(json_file, on_error="skip")
    assert len(loaded.records) == 1 and loaded.skipped[0].where == f"{json_file} item 2"
    header = tmp_path / "header.csv"
    header.write_bytes(b"instruction,outp\xfct\nfirst,x\n")
    with pytest.raises(DataError, match=r"header.csv row 1: the header is not valid UTF-8"):
        load_source(header, on_error="skip")


def test_json_that_parses_but_is_not_data_is_one_bad_row_each(tmp_path):
    # A lone surrogate escape is valid JSON but no text (the tokenizer raised a TypeError naming nothing); NaN
    # would be written back as invalid JSON; a key given twice would silently keep the last value.
    bad = {3: '{"instruction": "hi \\ud800", "output": "x"}', 5: '{"instruction": "a", "output": NaN}',
           7: '{"instruction": "a", "output": "x", "output": "OTHER"}', 8: '{"instruction": {"a": 1, "a": 2}}'}
    lines = [json.dumps(row) for row in animal_rows(10)]
    for line, text in bad.items():
        lines[line - 1] = text
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_source(path, on_error="skip")
    assert len(loaded.records) == 6
    assert [(s.where, s.problem.split(" (")[0].split(";")[0]) for s in loaded.skipped] == [
        (f"{path}:3", "not valid UTF-8"), (f"{path}:5", "invalid JSON: NaN is not a JSON value"),
        (f"{path}:7", "invalid JSON: key 'output' appears twice in one object"),
        (f"{path}:8", "invalid JSON: key 'a' appears twice in one object")]
    with pytest.raises(DataError, match=r"odd.jsonl:3: not valid UTF-8"):
        load_records(path)
    whole = tmp_path / "odd.json"
    whole.write_text('[{"instruction": "a", "output": "x"}, {"instruction": "b", "output": Infinity}]')
    with pytest.raises(DataError, match=r"odd.json item 2: invalid JSON: Infinity is not a JSON value"):
        load_records(whole)
    csv_file = tmp_path / "twice.csv"
    csv_file.write_text("instruction,output,output\nq,a,OTHER\n")
    with pytest.raises(DataError, match=r"twice.csv row 1: column 'output' appears twice in the header"):
        load_source(csv_file, on_error="skip")


def test_explicit_format_is_enforced(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", animal_rows(2))
    with pytest.raises(DataError, match="a.jsonl:1: field 'instruction': is missing"):
        load_records(path, "alpaca")


def test_json_array_and_wrapped_array(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(animal_rows(3)))
    (tmp_path / "b.json").write_text(json.dumps({"data": animal_rows(2)}))
    assert len(load_records(tmp_path / "a.json")) == 3
    assert len(load_records(tmp_path / "b.json")) == 2
    (tmp_path / "c.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"}]')
    with pytest.raises(DataError, match=r"c.json item 2: field 'instruction': is empty"):
        load_records(tmp_path / "c.json")


def test_csv_with_column_mapping_and_bad_rows(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,topic\n"What is 2+2?",4,math\nCapital of France?,Paris,geo\n')
    loaded = load_source(path, "alpaca", {"instruction": "question", "output": "answer"})
    assert [r.messages[1]["content"] for r in loaded.records] == ["4", "Paris"]
    assert loaded.records[1].meta == {"topic": "geo"}
    assert loaded.records[0].id == "qa.csv:2"  # spreadsheet row numbers: the header is row 1
    with pytest.raises(DataError) as info:
        load_source(path, "alpaca", {"instruction": "question"})
    assert info.value.problems == [f"{path}: missing column 'output' needed by format alpaca "
                                   "(columns: answer, instruction, topic); map yours with `columns:`"]
    path.write_text("question,answer\nok,fine\nonly-one-field\n")
    with pytest.raises(DataError, match=r"qa.csv row 3: has 1 fields but the header has 2"):
        load_source(path, "alpaca", {"instruction": "question", "output": "answer"})


def test_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r.messages[1]["content"] for r in load_records(tmp_path / "d.parquet")] == ["0", "1", "2", "3"]
    Dataset.from_list(rows + [{"instruction": "say 4", "output": " "}]).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"hf row 5: field 'output': is empty"):
        load_records(tmp_path / "hf")
    assert len(load_source(tmp_path / "hf", on_error="skip").records) == 4
    with pytest.raises(DataError, match="must be a datasets folder"):
        load_records(tmp_path)
