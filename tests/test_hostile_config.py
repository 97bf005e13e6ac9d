"""Hostile or broken configs and data files, through the real CLI: each ends in exit code 2 and one line
`error: FILE:LINE: ...` naming the place and the key (never a traceback, a hang, or a huge value printed),
or, where the input is merely unusual (a byte-order mark, a long CSV cell), it simply works."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli_process import run_tunelab
from tests.conftest import animal_rows, write_jsonl
from tunelab.config_file import load_config

ROOT = Path(__file__).resolve().parents[1]
HEAD = "data:\n  train: a.jsonl\n"  # lines 1-2 of every config below


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return run_tunelab(*args, cwd=ROOT, env=env, timeout=120)


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) < 400, lines[0]  # names the problem; never prints a huge value
    return lines[0][len("error: "):]


LAUGHS = "lol: &l0 [lol]\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))

CASES = {
    "non_utf8": (HEAD.encode() + b"  system_prompt: caf\xe9\n", 3, "not valid UTF-8 (byte 43)"),
    "deep_nesting": (HEAD + "train: " + "[" * 5000 + "]" * 5000 + "\n", 3, "nested more than 32 levels deep"),
    "deep_nesting_blocks": (HEAD + "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v: 1\n", 35,
                            "nested more than 32 levels deep"),
    "huge_int": (HEAD + "train:\n  max_steps: " + "9" * 5000 + "\n", 4,
                 "'train.max_steps' is an integer of 5000 digits; the most a config takes is 4300"),
    "recursive_anchor": (HEAD + "train: &t\n  nested: *t\n", 4, "'train.nested' refers to itself through a YAML alias"),
    "alias_bomb": (HEAD + LAUGHS, 8, "'l5' expands to more than 100000 values through YAML aliases"),
    "inf_learning_rate": (HEAD + "train:\n  learning_rate: .inf\n", 4,
                          "'train.learning_rate' must be a finite number, got inf"),
    "nan_learning_rate": (HEAD + "train:\n  learning_rate: .nan\n", 4,
                          "'train.learning_rate' must be a finite number, got nan"),
    "inf_epochs": (HEAD + "train:\n  epochs: .inf\n", 4, "'train.epochs'"),
    "nan_threshold": (HEAD + "  dedup:\n    threshold: .nan\n", 4, "'data.dedup.threshold'"),
    "inf_weight": ("data:\n  train:\n    - path: a.jsonl\n      weight: .inf\n", 4,
                   "'data.train.weight' must be a finite number, got inf"),
    "huge_weight": ("data:\n  train:\n    - path: a.jsonl\n      weight: 1.0e+7\n", 4,
                    "'data.train.weight': input should be less than or equal to 100"),
    "huge_num_perm": (HEAD + "  dedup:\n    num_perm: 1.0e+8\n", 4,
                      "'data.dedup.num_perm': input should be less than or equal to 1024, got 100000000.0"),
    "duplicate_key": (HEAD + "train:\n  epochs: 1\n  batch_size: 2\n  epochs: 3\n", 6,
                      "duplicate key 'train.epochs' (first at line 4); YAML would keep only the last"),
    "duplicate_section": (HEAD + "train: {epochs: 1}\ntrain: {epochs: 2}\n", 4, "duplicate key 'train' (first at line 3)"),
    "bad_regex": (HEAD + "  clean:\n    exclude_regex: ['ok', '(unclosed']\n", 4,
                  "data.clean.exclude_regex: '(unclosed' is not a valid regular expression"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_config_is_one_line_naming_file_line_and_key(tmp_path, case):
    text, line, expected = CASES[case]
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    error = one_error(run_cli("run", str(path), "--dry-run"))
    assert error.startswith(f"{path}:{line}: "), error
    assert expected in error, error


def test_non_finite_override_names_the_flag(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(HEAD)
    error = one_error(run_cli("run", str(path), "--dry-run", "--set", "train.learning_rate=inf"))
    assert error == f"{path} (--set train.learning_rate): 'train.learning_rate' must be a finite number, got inf"
    error = one_error(run_cli("run", str(path), "--dry-run", "--set", "train.max_steps=" + "9" * 5000))
    assert error.startswith("--set train.max_steps: the value cannot be read") and len(error) < 200


def test_a_nan_is_reported_with_the_other_mistakes_in_file_order(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("train:\n  learning_rate: .nan\n" + HEAD + "method:\n  type: lorra\n  r: -4\n")
    result = run_cli("run", str(path), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:2: 'train.learning_rate' must be a finite number, got nan",
        f"error: {path}:6: 'method.type' expects one of: lora, qlora, ia3, prompt_tuning, prefix_tuning, full, "
        "got 'lorra'",
        f"error: {path}:7: 'method.r': input should be greater than 0, got -4",
    ]


def test_alias_bomb_under_a_wrong_type_never_prints_the_expansion(tmp_path):
    path = tmp_path / "bomb.yaml"
    small = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    path.write_text(HEAD + small + "train:\n  epochs: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n")
    result = run_cli("run", str(path), "--dry-run")
    assert result.returncode == 2 and len(result.stderr) < 1500, result.stderr
    assert "'train.epochs' expects a number, got [[[" in result.stderr and "characters)" in result.stderr


def test_byte_order_mark_in_config_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + HEAD.encode() + b"train:\n  epochs: 2\n")
    cfg = load_config(path)
    assert str(cfg.data.train[0].path) == "a.jsonl" and cfg.train.epochs == 2


# Data files, through `tunelab data prep` on the tiny model.


def prep_config(tmp_path: Path, model_dir: Path, train: Path, **data: object) -> Path:
    path = tmp_path / "prep.yaml"
    raw = {"model": {"name": str(model_dir)}, "data": {"train": str(train), **data},
           "output": {"dir": str(tmp_path / "run")}}
    path.write_text(yaml.safe_dump(raw))
    return path


PATH_CASES = {  # key -> (YAML value, with {tmp} for the test's folder; what the error says)
    "under_a_file": ("output:\n  dir: {tmp}/notes.txt/run\n", 6, "output.dir: {tmp}/notes.txt is a file, not a folder"),
    "long_name": ("output:\n  dir: {tmp}/" + "x" * 300 + "\n", 6,
                  "output.dir: the name '" + "x" * 40 + "...' is 300 bytes long; file systems allow 255"),
    "nul_byte": ("", 4, "data.train.path: the path holds a NUL byte"),
    "link_loop": ("", 4, "data.train.path: Too many levels of symbolic links"),
    "sqlite_under_a_file": ("track:\n  tracking_uri: sqlite:///{tmp}/notes.txt/mlflow.db\n", 6,
                            "track.tracking_uri: {tmp}/notes.txt is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_a_path_no_file_system_can_open_is_named_before_anything_is_written(tmp_path, tiny_model_dir, case):
    """Before: an OSError traceback (NotADirectoryError, File name too long, embedded null byte, a symlink
    loop's RuntimeError) from the first stage that opened it, the tracking one after the run folder was written."""
    tail, line, expected = PATH_CASES[case]
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "loop").symlink_to("loop")
    train = {"nul_byte": '"{tmp}/a\\0.jsonl"', "link_loop": "{tmp}/loop"}.get(case, "{tmp}/a.jsonl")
    write_jsonl(tmp_path / "a.jsonl", animal_rows(20))
    path = tmp_path / "paths.yaml"
    path.write_text(("model:\n  name: " + str(tiny_model_dir) + "\ndata:\n  train: " + train + "\n" + tail
                     + ("output:\n  dir: {tmp}/run\n" if "output" not in tail else "")).format(tmp=tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    # The dry run says it; so does the run itself, before writing anything (the store's folder is the last made)
    for command in (("run", str(path), "--dry-run"), *([("run", str(path))] if case == "sqlite_under_a_file" else [])):
        error = one_error(run_cli(*command))
        assert error == f"{path}:{line}: {expected.format(tmp=tmp_path)}", error
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no store


def test_a_tracking_uri_mlflow_has_no_store_for_is_said_before_anything_is_written(tmp_path, tiny_model_dir):
    """Before: data prep wrote the run folder (config.yaml, data/) and only then the tracker refused the URI."""
    write_jsonl(tmp_path / "a.jsonl", animal_rows(20))
    path = tmp_path / "ftp.yaml"
    raw = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "a.jsonl")},
           "track": {"tracking_uri": "ftp://user:TrackPw55@host/x"}, "output": {"dir": str(tmp_path / "run")}}
    path.write_text(yaml.safe_dump(raw))
    for command in (("run", str(path), "--dry-run"), ("data", "prep", str(path))):
        error = one_error(run_cli(*command))
        assert error.startswith("track.tracking_uri: Model registry functionality is unavailable; got unsupported "
                                "URI 'ftp://user:***@host/x'"), error
    assert not (tmp_path / "run").exists()
    raw["track"]["tracking_uri"] = "http://127.0.0.1:9"  # a server URI is checked offline: nothing answers there
    path.write_text(yaml.safe_dump(raw))
    done = run_cli("run", str(path), "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_path_the_file_system_refuses_later_is_one_line(tmp_path, tiny_model_dir):
    """A folder that looks fine but cannot be made (/proc takes no new entries): the OSError is one line naming
    it, not a traceback."""
    write_jsonl(tmp_path / "a.jsonl", animal_rows(20))
    path = tmp_path / "proc.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)},
                                    "data": {"train": str(tmp_path / "a.jsonl")}, "track": {"enabled": False},
                                    "output": {"dir": "/proc/tunelab-run"}}))
    assert one_error(run_cli("data", "prep", str(path))) == "/proc/tunelab-run: No such file or directory"


def test_byte_order_mark_in_jsonl_and_csv_is_accepted(tmp_path, tiny_model_dir):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in animal_rows(20)).encode())
    result = run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, jsonl)))
    assert result.returncode == 0, result.stderr
    table = tmp_path / "bom.csv"
    table.write_bytes(b"\xef\xbb\xbfinstruction,output\n" + "".join(f"Question {i}?,{i}\n" for i in range(20)).encode())
    result = run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, table)))
    assert result.returncode == 0, result.stderr


def test_csv_cells_over_128_kib_are_read_and_over_16_mib_named(tmp_path, tiny_model_dir):
    table = tmp_path / "long.csv"
    long = "word " * 40_000  # 200 KB, past csv's default 128 KiB field limit
    table.write_text("instruction,output\n" + "".join(f"Question {i}?,{i}\n" for i in range(20))
                     + f"\"{long}\",long\n")
    result = run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, table)))
    assert result.returncode == 0, result.stderr
    table.write_text("instruction,output\nQuestion?,1\n" + f"\"{'x' * (17 << 20)}\",huge\n")
    error = one_error(run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, table))))
    assert error == f"{table} row 3: a field is longer than 16 MiB; split the text or use JSONL"


def test_broken_save_to_disk_folder_is_one_line(tmp_path, tiny_model_dir):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{not json")
    (folder / "state.json").write_text("{}")
    error = one_error(run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, folder))))
    assert error.startswith(f"{folder}: cannot read the datasets folder (save_to_disk): ")


@pytest.mark.parametrize("row, problem", [
    ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
    ('{"messages": ' + "[" * 80 + "]" * 80 + "}", "nested more than 64 levels deep"),
    ('{"id": ' + "9" * 5000 + "}", "a number too long to read"),
], ids=["deep_array", "deep_messages", "huge_int"])
def test_hostile_jsonl_rows_name_the_line(tmp_path, tiny_model_dir, row, problem):
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, animal_rows(5))
    with open(rows, "a") as f:
        f.write(row + "\n")
    error = one_error(run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, rows))))
    assert error.startswith(f"{rows}:6: invalid JSON: {problem}"), error


def test_all_rows_too_long_keeps_the_report_and_names_the_file(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "long.jsonl", animal_rows(12))
    error = one_error(run_cli("data", "prep", str(prep_config(tmp_path, tiny_model_dir, rows, clean={"max_tokens": 3}))))
    report = tmp_path / "run" / "data" / "report.md"
    assert error == f"{rows}: no training examples left of 12 rows (removed too long: 12); see {report}"
    assert json.loads(report.with_suffix(".json").read_text())["filters"]["too_long"] == 12
