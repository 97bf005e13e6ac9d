"""Rehearsal (replay) rows: the base model's own answers to the bundled pool, or general chat files, mixed into
the training split only, counted in the report, and their loss logged apart from the task's."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import animal_rows, write_jsonl
from tunelab import pipeline
from tunelab.data import replay as replay_module
from tunelab.data.prepare import prepare_data
from tunelab.data.replay import replay_count
from tunelab.errors import DataError

GENERAL = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."},
                                        {"role": "assistant", "content": f"Sea fact {i}: it is salty water."}]}
           for i in range(40)]


def test_ratio_is_the_share_of_the_training_split():
    assert replay_count(300, 0.2) == 75 and replay_count(300, 0.0) == 0 and replay_count(10, 0.5) == 10
    assert replay_count(80, 0.2) / (80 + replay_count(80, 0.2)) == 0.2


def test_replay_files_join_the_training_split_only_and_are_counted(tiny_config, tmp_path):
    tiny_config.data.replay = {"ratio": 0.25, "from_self": False, "files": [str(write_jsonl(tmp_path / "g.jsonl",
                                                                                              GENERAL))]}
    prepared = prepare_data(tiny_config, tmp_path / "data")
    train = prepared.dataset.train
    replay = [r for r in train if r.meta.get("replay")]
    task = len(train) - len(replay)
    assert len(replay) == replay_count(task, 0.25) > 0
    assert all(r.id.startswith("replay:") and r.meta["replay"] == "file:g.jsonl" for r in replay)
    assert not any(r.meta.get("replay") for r in [*prepared.dataset.val, *prepared.dataset.test])
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["replay"]["rows"] == len(replay) and report["replay"]["sources"] == {"file:g.jsonl": len(replay)}
    assert f"{len(replay)} replay rows" in (tmp_path / "data" / "report.md").read_text()
    # Saved with its marker: training reads it back from train.jsonl.
    saved = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert sum(1 for row in saved if row.get("meta", {}).get("replay")) == len(replay)


def test_replay_rows_overlapping_eval_data_are_dropped(tiny_config, tmp_path):
    test_rows = animal_rows(8, seed=1, start=1000)
    leaky = GENERAL[:10] + [{"id": "leak", "messages": test_rows[0]["messages"]}]
    tiny_config.data.replay = {"ratio": 0.5, "from_self": False, "files": [str(write_jsonl(tmp_path / "g.jsonl", leaky))]}
    prepared = prepare_data(tiny_config, tmp_path / "data")
    assert "replay:leak" not in {r.id for r in prepared.dataset.train}
    assert prepared.report["replay"]["dropped_overlapping_eval"] == 1


def test_self_answers_are_generated_once_and_cached(tiny_config, tmp_path, monkeypatch):
    pool = [{"id": f"pool-{i:04d}", "category": "c", "prompt": f"Say something about the number {i}."}
            for i in range(12)]
    monkeypatch.setattr(replay_module, "pool_prompts", lambda: pool)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    calls = []
    real = replay_module._generate

    def counted(*args):
        calls.append(1)
        answers = real(*args)
        answers[0] = None  # as if the first answer ran past the budget: it must not be used
        return answers

    monkeypatch.setattr(replay_module, "_generate", counted)
    tiny_config.data.replay = {"ratio": 0.2, "from_self": True, "max_new_tokens": 8}
    first = replay_module.self_answers(tiny_config)
    second = replay_module.self_answers(tiny_config)
    assert len(calls) == 1  # the second run reads the cache
    assert [r.id for r in first] == [r.id for r in second] and "replay:pool-0000" not in {r.id for r in first}
    assert all(r.messages[0]["content"] == p["prompt"] for r, p in zip(first, pool[1:]))
    assert len(list((tmp_path / "cache" / "replay").glob("answers-*.jsonl"))) == 1


def test_replay_is_for_sft_chat_rows(tiny_config, tmp_path):
    tiny_config.objective.type = "dpo"
    tiny_config.data.replay = {"ratio": 0.2, "from_self": False, "files": [str(write_jsonl(tmp_path / "g.jsonl", GENERAL))]}
    prefs = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": "good", "rejected": "bad"} for i in range(20)]
    tiny_config.data.train = [{"path": str(write_jsonl(tmp_path / "p.jsonl", prefs))}]
    tiny_config.data.test = []
    with pytest.raises(DataError, match="data.replay: rehearsal rows are chat conversations for objective sft"):
        prepare_data(tiny_config, tmp_path / "data")


def test_training_logs_the_task_and_replay_losses_apart(tiny_config, tmp_path):
    tiny_config.data.replay = {"ratio": 0.3, "from_self": False, "files": [str(write_jsonl(tmp_path / "g.jsonl",
                                                                                             GENERAL))]}
    tiny_config.train.max_steps = 4
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if '"loss"' in line]
    split = [r for r in rows if "replay_loss" in r]
    assert split, rows
    for r in split:
        assert math.isfinite(r["task_loss"]) and math.isfinite(r["replay_loss"])
        # The logged loss is the token-weighted mean of the two parts, so it lies between them.
        low, high = sorted((r["task_loss"], r["replay_loss"]))
        assert low - 1e-3 <= r["loss"] <= high + 1e-3


def test_a_dry_run_never_generates_self_answers_and_says_they_are_pending(tiny_config, tmp_path, monkeypatch):
    from tunelab import pipeline

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(replay_module, "_generate", lambda *a: pytest.fail("a dry run loaded weights to generate"))
    tiny_config.data.replay = {"ratio": 0.2, "from_self": True}
    lines = pipeline.preflight(tiny_config)
    replay = [line for line in lines if line.startswith("replay:")]
    assert len(replay) == 1 and "rows wanted" in replay[0] and "not generated yet" in replay[0], lines
    assert not (tmp_path / "cache" / "replay").exists()
