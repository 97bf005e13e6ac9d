"""The whole data stage: sources in, Dataset folder + report out; cached; contamination policy enforced."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli_process import run_tunelab
from tests.conftest import animal_rows, write_jsonl
from tunelab.config_file import dump_config, validate_config
from tunelab.data.prepare import load_dataset, prepare_data
from tunelab.errors import DataError

LEAK = "In the novel the old lighthouse keeper counted seventeen ships passing the northern cape before the storm"


def distinct_rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"q{i}", "instruction": f"Question number {i}: what is {i} plus {i * 3}?", "output": str(4 * i),
             "topic": "even" if i % 2 == 0 else "odd"} for i in range(start, start + n)]


def config(tmp_path, tiny_model_dir, **data):
    return validate_config({"model": {"name": str(tiny_model_dir)}, "data": data,
                            "output": {"dir": str(tmp_path / "run")}})


def test_mixed_sources_weights_and_report(tmp_path, tiny_model_dir):
    main = write_jsonl(tmp_path / "main.jsonl", distinct_rows(60) + [distinct_rows(1, 5)[0] | {"id": "dup5"}])
    extra = tmp_path / "extra.csv"
    extra.write_text("question,answer\n" + "".join(f"Extra item {i} please,{i}\n" for i in range(20)))
    cfg = config(tmp_path, tiny_model_dir, train=[
        {"path": str(main)},
        {"path": str(extra), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"},
         "weight": 2.0},
    ], val_fraction=0.1, test_fraction=0.1, clean={"exclude_keywords": ["item 3 "]})
    folder = tmp_path / "run" / "data"
    prepared = prepare_data(cfg, folder)
    report = prepared.report
    assert report["loaded"] == 81
    assert report["filters"]["keyword"] == 1
    assert report["dedup"]["exact"] == 1 and report["dedup"]["pairs"][0] == {"kept": "q5", "removed": "dup5", "how": "exact"}
    # 79 rows split 63/8/8; the 16 or so extra.csv rows in train appear twice.
    counts = report["counts"]
    assert counts["val"] + counts["test"] == 16
    extra_train = [r for r in prepared.dataset.train if r.source.startswith(str(extra))]
    assert len(extra_train) == 2 * len({r.id.split("#")[0] for r in extra_train})
    assert report["roles"]["user"] == report["roles"]["assistant"] == sum(counts.values())
    assert set(report["token_lengths"]["counts"]) == {"train", "val", "test"}
    assert sum(report["token_lengths"]["counts"]["train"]) == counts["train"]
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "report.json", "report.md", "manifest.json"):
        assert (folder / name).is_file()
    assert load_dataset(folder).counts() == counts
    assert "| near duplicates |" in (folder / "report.md").read_text()


def test_rerun_on_unchanged_inputs_does_no_work(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", distinct_rows(30))
    cfg = config(tmp_path, tiny_model_dir, train=str(path))
    folder = tmp_path / "run" / "data"
    prepare_data(cfg, folder)
    stamp = (folder / "report.json").stat().st_mtime_ns
    prepare_data(cfg, folder)
    assert (folder / "report.json").stat().st_mtime_ns == stamp
    write_jsonl(path, distinct_rows(31))
    assert prepare_data(cfg, folder).report["loaded"] == 31


def test_contamination_fails_by_default_and_names_rows(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", distinct_rows(20) + [{"id": "leaky", "instruction": f"Recall: {LEAK}",
                                                                          "output": "x"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"id": "t1", "instruction": LEAK, "output": "17"}])
    cfg = config(tmp_path, tiny_model_dir, train=str(train), test=str(test))
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tmp_path / "run" / "data")
    assert "data.contamination: 1 training rows overlap eval data: leaky ~ test t1 (ngram)" in info.value.problems[0]
    assert not (tmp_path / "run" / "data").exists()

    cfg.data.contamination.action = "drop"
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    assert "leaky" not in {r.id for r in prepared.dataset.train}
    assert prepared.report["contamination"]["dropped"] == 1
    assert prepared.report["contamination"]["per_source"] == {"test": 1}


def test_a_val_row_that_repeats_a_test_row_is_a_leak_too(tmp_path, tiny_model_dir):
    # Every training-source row repeats a row of the explicit test file: whichever land in val steer checkpoint
    # choice toward the test, so they are checked like the training rows.
    rows = distinct_rows(40)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [r | {"id": f"t{r['id']}"} for r in rows[:40]])
    cfg = config(tmp_path, tiny_model_dir, train=str(train), test=str(test), val_fraction=0.25,
                 contamination={"action": "warn"})
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    contamination = prepared.report["contamination"]
    val_ids = {r.id for r in prepared.dataset.val}
    assert len(val_ids) == 10 and contamination["val_rows"] == 10
    assert {h["train_id"] for h in contamination["val_hits"]} == val_ids
    assert all(h["eval_id"] == f"t{h['train_id']}" and h["eval_source"] == "test" for h in contamination["val_hits"])
    summary = (tmp_path / "run" / "data" / "report.md").read_text()
    assert "## Val rows that overlap test or benchmark data (warn)" in summary

    cfg.data.contamination.action = "fail"
    # Only the val rows repeat the test file: the training rows' check passes, the val rows' check stops it.
    val_only = write_jsonl(tmp_path / "test2.jsonl", [
        next(r for r in rows if r["id"] == v) | {"id": f"t{v}"} for v in sorted(val_ids)])
    cfg = config(tmp_path, tiny_model_dir, train=str(train), test=str(val_only), val_fraction=0.25)
    with pytest.raises(DataError, match=r"data.contamination: 10 val rows overlap test or benchmark data: q\d+ ~ "
                                        r"test tq\d+ \(exact\)"):
        prepare_data(cfg, tmp_path / "run" / "data3")
    assert not (tmp_path / "run" / "data3").exists()
    cfg.data.contamination.action = "drop"
    prepared = prepare_data(cfg, tmp_path / "run" / "data4")
    assert prepared.dataset.val == [] and prepared.report["contamination"]["val_rows"] == 10
    assert len(prepared.dataset.train) == 30 and len(prepared.dataset.test) == 10


def test_a_dropped_leak_takes_no_innocent_row_sharing_its_id(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    # Two files of the same name, each numbering its rows from 0: the ids collide across them.
    first = write_jsonl(tmp_path / "a" / "train.jsonl", [r | {"id": str(i)} for i, r in enumerate(distinct_rows(20))])
    second = write_jsonl(tmp_path / "b" / "train.jsonl", [r | {"id": str(i)} for i, r in enumerate(
        distinct_rows(19, start=100) + [{"instruction": f"Recall: {LEAK}", "output": "x"}])])
    test = write_jsonl(tmp_path / "test.jsonl", [{"id": "t1", "instruction": LEAK, "output": "17"}])
    cfg = config(tmp_path, tiny_model_dir, train=[str(first), str(second)], test=str(test), val_fraction=0,
                 contamination={"action": "drop"})
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    train = prepared.dataset.train
    assert len(train) == 39 and prepared.report["contamination"]["dropped"] == 1
    assert not any(LEAK in r.all_text() for r in train)
    assert "Question number 19: what is 19 plus 57?" in {r.messages[0]["content"] for r in train}  # a/ row 19
    assert len({r.id for r in train}) == 39  # every row keeps an id of its own


def test_a_row_without_the_stratify_column_is_one_bad_row(tmp_path, tiny_model_dir):
    rows = distinct_rows(40)
    del rows[7]["topic"]
    rows[9]["topic"] = None
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = config(tmp_path, tiny_model_dir, train=str(path), stratify_by="topic")
    with pytest.raises(DataError, match=r"t.jsonl:8: data.stratify_by column 'topic' is missing or null in row q7"):
        prepare_data(cfg, tmp_path / "run" / "data")
    cfg.data.on_error = "skip"
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    assert sum(prepared.dataset.counts().values()) == 38
    assert [s["where"] for s in prepared.report["skipped"]["examples"]] == [f"{path}:8", f"{path}:10"]


def test_a_missing_number_in_parquet_is_absent_not_nan_in_the_dataset_files(tmp_path, tiny_model_dir):
    """Parquet (and pandas) write a missing float as NaN. Kept as metadata it was written into train.jsonl as
    `NaN`, which no strict JSON reader (tunelab's own included) accepts; as a stratify column it made a stratum."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = distinct_rows(40)
    for i, row in enumerate(rows):
        row["score"] = float("nan") if i % 5 == 0 else i / 10
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    prepared = prepare_data(config(tmp_path, tiny_model_dir, train=str(tmp_path / "t.parquet")),
                            tmp_path / "run" / "data")
    for split in ("train", "val", "test"):
        text = (tmp_path / "run" / "data" / f"{split}.jsonl").read_text()
        for line in text.splitlines():
            json.loads(line, parse_constant=lambda name: pytest.fail(f"{split}.jsonl holds {name}"))
    scores = {r.id: r.meta.get("score") for r in prepared.dataset.train}
    assert None in scores.values() and all(v is None or v == v for v in scores.values())
    cfg = config(tmp_path, tiny_model_dir, train=str(tmp_path / "t.parquet"), stratify_by="score")
    with pytest.raises(DataError, match=r"t.parquet row 1: data.stratify_by column 'score' is missing or null"):
        prepare_data(cfg, tmp_path / "run2" / "data")


def test_benchmark_files_are_checked(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", distinct_rows(20) + [{"id": "leaky", "instruction": LEAK, "output": "x"}])
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question": LEAK, "answer": "17"}])
    cfg = config(tmp_path, tiny_model_dir, train=str(train), contamination={"benchmarks": str(bench), "action": "warn"})
    report = prepare_data(cfg, tmp_path / "run" / "data").report
    assert report["contamination"]["per_source"] == {"bench.jsonl": 1}
    assert report["contamination"]["dropped"] == 0


def test_a_benchmark_question_pasted_into_many_rows_is_reported(tmp_path, tiny_model_dir, capsys):
    pasted = [{"id": f"p{i}", "instruction": f"{LEAK} (copy {i})", "output": str(i)} for i in range(4)]
    train = write_jsonl(tmp_path / "train.jsonl", distinct_rows(20) + pasted)
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"id": "b1", "question": LEAK, "answer": "17"}])
    # No val or test split: the copies would also leak into each other across splits.
    cfg = config(tmp_path, tiny_model_dir, train=str(train), contamination={"benchmarks": str(bench)},
                 val_fraction=0.0, test_fraction=0.0)
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    contamination = prepared.report["contamination"]
    assert contamination["hits"] == [] and [(s["eval_id"], s["train_rows"]) for s in contamination["shared"]] == \
        [("b1", 4)]
    assert "1 eval rows are mostly phrasing that many training rows repeat (e.g. bench.jsonl b1, in 4 training " \
        "rows)" in " ".join(capsys.readouterr().err.split())
    summary = (tmp_path / "run" / "data" / "report.md").read_text()
    assert "## Eval rows made of shared phrasing" in summary and "| b1 | bench.jsonl | 4 |" in summary


def test_mixed_row_kinds_are_refused(tmp_path, tiny_model_dir):
    chat_rows = write_jsonl(tmp_path / "a.jsonl", animal_rows(5))
    prefs = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"the sources mix row kinds \(chat: 5, preference: 1\)"):
        prepare_data(config(tmp_path, tiny_model_dir, train=[str(chat_rows), str(prefs)]), tmp_path / "d")


def test_cli_data_prep_prints_summary_and_fails_cleanly(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", distinct_rows(40))
    config_path = tmp_path / "c.yaml"
    config_path.write_text(dump_config(config(tmp_path, tiny_model_dir, train=str(path))))
    env = {**os.environ, "COLUMNS": "200"}
    result = run_tunelab("data", "prep", str(config_path), env=env)
    assert result.returncode == 0, result.stderr
    assert "near duplicates" in result.stdout and "train" in result.stdout
    assert json.loads((tmp_path / "run/data/report.json").read_text())["counts"]["train"] == 32

    path.write_text(path.read_text() + "{oops\n")
    result = run_tunelab("data", "prep", str(config_path), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}:41: invalid JSON: Expecting property name enclosed in double "
                                     "quotes at column 2")
    assert json.loads((tmp_path / "run/data/report.json").read_text())["counts"]["train"] == 32  # old data intact


def test_rows_longer_than_the_models_context_are_dropped_whatever_max_length_says(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 128  # data.max_length stays at its default, 2048
    (model / "config.json").write_text(json.dumps(config))
    long_rows = [{"id": f"long{i}", "instruction": f"Story {i}: " + "the owl watched the river " * 60, "output": "owl"}
                 for i in range(3)]
    train = write_jsonl(tmp_path / "train.jsonl", distinct_rows(30) + long_rows)
    cfg = validate_config({"model": {"name": str(model)}, "data": {"train": str(train)},
                           "output": {"dir": str(tmp_path / "run")}})
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    assert prepared.report["filters"]["too_long"] == 3 and cfg.data.max_length == 2048
    assert prepared.report["removed_ids"]["too_long"] == ["long0", "long1", "long2"]
    kept = [r.id for split in (prepared.dataset.train, prepared.dataset.val, prepared.dataset.test) for r in split]
    assert len(kept) == 30 and not any(i.startswith("long") for i in kept)
