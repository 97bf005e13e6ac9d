"""The sweep folder keeps what it must: sweep.json holds no secret in clear, and output.overwrite moves an old
sweep aside only once the new sweep's data has validated, and removes it only once a new trial has finished (no
Ray, no training: data prep and the sweep record only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import animal_rows, write_jsonl
from tunelab.errors import DataError
from tunelab.sweep.folder import finish_replacement, kept_aside, open_sweep, start_sweep
from tunelab.sweep.state import SweepState
from tunelab.sweep.plan import Flags
from tunelab.sweep.run import plan_sweep

FLAGS = Flags(params=["train.learning_rate=1e-4,1e-3"])


def _started(cfg) -> Path:
    plan = plan_sweep(cfg, FLAGS)
    start_sweep(plan, open_sweep(plan, resume=False))
    return plan.root


def test_sweep_json_records_the_config_with_its_secrets_redacted(tiny_config, tmp_path):
    cfg = tiny_config.model_copy(deep=True)
    cfg.output.dir = tmp_path / "sweep"
    cfg.track.tracking_uri = "https://mlflow:Ab/c9+Xy@tracking.example:5000/"  # a password with a slash in it
    root = _started(cfg)
    stored = (root / "sweep.json").read_text()
    assert "Ab/c9+Xy" not in stored and "c9+Xy" not in stored and "tracking.example" in stored


def test_overwrite_keeps_the_old_sweep_until_the_new_data_validates(tiny_config, tmp_path):
    cfg = tiny_config.model_copy(deep=True)
    cfg.output.dir = tmp_path / "sweep"
    root = _started(cfg)
    trial = root / "trial-000-learning_rate=0.0001"
    trial.mkdir()
    (trial / "metrics.jsonl").write_text("{}\n")  # a trial the old sweep ran
    before = (root / "sweep.json").read_bytes()

    rows = animal_rows(30)
    rows[3]["messages"][1]["role"] = "bot"
    bad = cfg.model_copy(deep=True)
    bad.output.overwrite = True
    bad.data.train[0].path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match="unknown role 'bot'"):
        _started(bad)
    assert (root / "sweep.json").read_bytes() == before and (trial / "metrics.jsonl").is_file()

    good = cfg.model_copy(deep=True)
    good.output.overwrite = True
    good.data.train[0].path = write_jsonl(tmp_path / "other.jsonl", animal_rows(30, start=100))
    _started(good)
    assert not trial.exists() and (root / "sweep.json").read_bytes() != before
    assert sorted(p.name for p in root.iterdir()) == ["config.yaml", "data", "sweep.json"]
    # The old sweep waits aside, its trials whole, until a trial of the new one has finished.
    aside = kept_aside(root)
    assert (aside / "sweep.json").read_bytes() == before and (aside / trial.name / "metrics.jsonl").is_file()
    state = SweepState.load(root)
    finish_replacement(root, state)  # every new trial failed or is pending: the old sweep stays
    assert aside.is_dir()
    state.trials[1].status = "finished"
    finish_replacement(root, state)
    assert not aside.exists()


def test_replacing_an_unfinished_replacement_keeps_the_older_sweep(tiny_config, tmp_path):
    cfg = tiny_config.model_copy(deep=True)
    cfg.output.dir = tmp_path / "sweep"
    root = _started(cfg)
    old = (root / "sweep.json").read_bytes()
    cfg.output.overwrite = True
    _started(cfg)  # killed before any trial finished: the first sweep is still aside
    _started(cfg)  # and replaced again: the unfinished one goes, the first sweep stays aside
    assert (kept_aside(root) / "sweep.json").read_bytes() == old
    # A replacement with a finished trial is the one kept aside when it is replaced in turn.
    state = SweepState.load(root)
    state.trials[0].status = "finished"
    state.save()
    finished = (root / "sweep.json").read_bytes()
    _started(cfg)
    assert (kept_aside(root) / "sweep.json").read_bytes() == finished
