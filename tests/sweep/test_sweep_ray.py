"""`tunelab sweep` on a real local Ray cluster with the tiny model: the best trial matches a hand check, ASHA stops
trials whose val loss trails, every trial is an ordinary run folder and an MLflow child run, sweep.html renders in
headless Chromium, and a sweep killed with SIGKILL resumes without re-running its finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.serve.browser import BINARY, Browser
from tunelab.sweep.plan import Flags
from tunelab.sweep.run import plan_sweep, run_sweep

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _base(tiny_config, folder: Path, track: bool = False):
    cfg = tiny_config.model_copy(deep=True)
    cfg.eval.systems = ["base", "tuned"]
    cfg.train.save_steps = None
    cfg.track.enabled = track
    cfg.output.dir = folder
    return cfg


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "metrics.json").read_text())


def _loss(run_dir: Path, system: str) -> float:
    return _metrics(run_dir)["suites"]["test"]["systems"][system]["eval_loss"]


def test_four_trials_find_the_trial_a_hand_check_says_is_best(tiny_config, tmp_path, ray_session):
    cfg = _base(tiny_config, tmp_path / "runs" / "sweep", track=True)
    # A learning rate of 1e-9 cannot move the model in 2 or 12 steps; 1e-2 learns, more in 12 steps than in 2.
    flags = Flags(params=["train.learning_rate=1e-9,1e-2", "train.max_steps=2,12"], objective="tuned.eval_loss",
                  constraints=["tuned.eval_loss <= base.eval_loss - 1"], max_concurrent=2)
    started = time.perf_counter()
    outcome = run_sweep(plan_sweep(cfg, flags))
    print(f"4-trial sweep on Ray: {time.perf_counter() - started:.1f} s")
    root = Path(cfg.output.dir)
    names = [t.name for t in outcome.plan.trials]

    # The hand check, from the run folders alone: lowest tuned eval loss among trials at least 1 below the base.
    losses = {n: _loss(root / n, "tuned") for n in names}
    feasible = [n for n in names if losses[n] <= _loss(root / n, "base") - 1]
    assert feasible == [n for n in names if "learning_rate=0.01" in n]  # the 1e-9 trials learned nothing
    by_hand = min(feasible, key=losses.get)
    assert by_hand == "trial-003-learning_rate=0.01-max_steps=12"
    assert outcome.summary.best.name == by_hand and outcome.summary.best.objective == losses[by_hand]
    assert [t.name for t in outcome.summary.ranked][0] == by_hand
    assert not (root / "ray").exists()

    # Every trial is an ordinary, complete run folder.
    from tunelab.config_file import load_run_config

    for t in outcome.plan.trials:
        trial_cfg, run = load_run_config(root / t.name)
        assert trial_cfg.train.learning_rate == t.params["train.learning_rate"]
        assert trial_cfg.train.max_steps == t.params["train.max_steps"]
        assert (run.adapter / "adapter_config.json").is_file() and (run.eval / "report.html").is_file()
        assert json.loads(run.manifest.read_text())["train"]["steps"] == t.params["train.max_steps"]

    # best.yaml is the winning config, ready for `tunelab run`.
    from tunelab.config_file import load_config

    best = load_config(outcome.best)
    assert best.train.learning_rate == 1e-2 and best.train.max_steps == 12 and best.sweep.params == {}
    assert Path(best.output.dir) == root.parent / "sweep-best"

    # MLflow: one parent run, the four trials its children, each with its training curve and eval numbers.
    from mlflow import MlflowClient

    state = json.loads((root / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root.parent / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["tunelab.best_trial"] == by_hand
    assert parent.data.metrics["best.tuned.eval_loss"] == pytest.approx(losses[by_hand])
    experiment = client.get_experiment_by_name("tunelab").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(names)
    for child in children:
        assert child.info.status == "FINISHED"
        assert "eval.test.tuned.eval_loss" in child.data.metrics and "loss" in child.data.metrics

    if BINARY is not None:
        _check_page(root / "sweep.html", tmp_path / "profile", points=4, lines=4)

    # Ranked again under another goal without training anything: maximizing the loss, the 1e-9 trials score
    # highest but break the constraint, so the hand check picks the 2-step 1e-2 trial.
    stamps = {n: _metrics(root / n)["created_unix"] for n in names}
    again = run_sweep(plan_sweep(cfg, Flags(mode="max"), resume=True), resume=True)
    feasible_max = max(feasible, key=losses.get)
    assert again.summary.best.name == feasible_max == "trial-002-learning_rate=0.01-max_steps=2"
    assert {n: _metrics(root / n)["created_unix"] for n in names} == stamps


def _check_page(page: Path, profile: Path, points: int, lines: int) -> None:
    """The page renders in a real browser from the file alone: no request leaves it, and its charts hold one
    point per finished trial and one line per trial that ran, with the best one marked."""
    browser = Browser(profile)
    try:
        browser.open(page.as_uri())
        browser.wait_for("document.readyState === 'complete'")
        assert browser.evaluate("document.querySelectorAll('svg.scatter circle.point').length") == points
        assert browser.evaluate("document.querySelectorAll('svg.parallel polyline.trial-line').length") == lines
        assert browser.evaluate("document.querySelectorAll('circle.best-ring').length") >= 1
        assert browser.evaluate("document.querySelectorAll('polyline.trial-line.best').length") == 1
        # Drawn, not just present: every chart has a real size on the page.
        sizes = browser.evaluate("[...document.querySelectorAll('svg')].map(s => s.getBBox().width * "
                                 "s.getBoundingClientRect().height)")
        assert sizes and all(size > 0 for size in sizes)
        assert browser.evaluate("performance.getEntriesByType('resource').length") == 0  # self-contained
        assert browser.evaluate("document.scripts.length") == 0
    finally:
        browser.close()


def test_asha_stops_the_trials_whose_val_loss_trails(tiny_config, tmp_path, ray_session):
    cfg = _base(tiny_config, tmp_path / "asha", track=True)
    cfg.train.max_steps, cfg.train.eval_steps = 8, 2  # val loss at steps 2, 4, 6, 8; rungs at 2 and 6
    # One trial at a time, the learning one first: at the first rung (step 2) the others' val loss is far worse.
    flags = Flags(params=["train.learning_rate=1e-2,1e-9,1e-10"], objective="tuned.eval_loss", max_concurrent=1)
    plan = plan_sweep(cfg, flags)
    assert plan.early_stopping and plan.grace_steps == 2
    outcome = run_sweep(plan)
    root = Path(cfg.output.dir)
    status = {t.name: t.status for t in outcome.summary.ranked}
    learner, *idle = [t.name for t in plan.trials]
    assert status == {learner: "finished", idle[0]: "stopped", idle[1]: "stopped"}
    assert outcome.summary.best.name == learner

    def evals(name: str) -> list[int]:
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "eval_loss" in r]

    assert evals(learner) == [2, 4, 6, 8]
    for name in idle:  # stopped at the first rung: no later training, no adapter, no eval
        assert evals(name) == [2]
        assert not (root / name / "adapter").exists() and not (root / name / "eval").exists()
        assert not (root / name / "trial_error.txt").exists()  # stopped is not failed
    state = json.loads((root / "sweep.json").read_text())
    assert [t["step"] for t in state["trials"]] == [8, 2, 2]
    html = (root / "sweep.html").read_text()
    assert html.count('class="trial-line stopped"') == 2 and html.count('class="line-end"') == 2
    assert not (root / "ray").exists()  # Tune's own bookkeeping is gone; sweep.json is the record

    # The stopped trials' MLflow runs are ended, not left running, and say why.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root.parent / 'mlflow.db'}")
    for name, expected in ((learner, "FINISHED"), (idle[0], "KILLED"), (idle[1], "KILLED")):
        run = client.get_run(json.loads((root / name / "mlflow_run.json").read_text())["run_id"])
        assert run.info.status == expected and run.data.tags["mlflow.parentRunId"] == state["parent_run_id"]
        if expected == "KILLED":
            assert run.data.tags["tunelab.sweep_trial_end"] == "stopped by ASHA at step 2"


def _stamp(run_dir: Path) -> tuple[float, int]:
    """When the trial's eval and adapter were written: a trial run again would change both."""
    return _metrics(run_dir)["created_unix"], (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def _sweep_state(root: Path) -> dict:
    try:
        return json.loads((root / "sweep.json").read_text())
    except (OSError, ValueError):
        return {"trials": []}


def test_a_sweep_killed_with_sigkill_resumes_and_runs_only_the_unfinished_trials(tiny_config, tmp_path):
    cfg = _base(tiny_config, tmp_path / "killed")
    cfg.train.max_steps = 6
    config = _write(cfg, tmp_path / "sweep.yaml")
    root = Path(cfg.output.dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "tunelab", "sweep", str(config), "--param", "train.learning_rate=1e-3,3e-3,1e-2,3e-2",
               "--objective", "tuned.eval_loss", "--max-concurrent", "1"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while sum(t["status"] == "finished" for t in _sweep_state(root)["trials"]) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "two trials did not finish in time"
            time.sleep(0.5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        time.sleep(2)
        try:  # anything of the killed sweep still alive (Ray's processes follow their driver; be sure)
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()

    before = _sweep_state(root)["trials"]
    done = {t["name"] for t in before if t["status"] == "finished"}
    assert len(done) >= 2 and len(done) < 4
    stamps = {n: _stamp(root / n) for n in done}
    # A trial can be killed between writing its metrics and the driver recording it: the resume must count it as
    # finished (not run it again); every other trial under way starts over.
    under_way = [t["name"] for t in before if t["status"] == "running"]
    evaluated = {n for n in under_way if (root / n / "eval" / "metrics.json").is_file()}
    stamps |= {n: _stamp(root / n) for n in evaluated}

    resumed_at = time.time()
    resumed = subprocess.run([sys.executable, "-m", "tunelab", "sweep", str(config), "--resume"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = {t["name"]: t for t in _sweep_state(root)["trials"]}
    assert all(t["status"] == "finished" for t in after.values())
    for name, stamp in stamps.items():  # finished before the kill: not run again
        assert after[name]["attempts"] == 1
        assert _stamp(root / name) == stamp
    rerun = [n for n in after if n not in done | evaluated]
    assert rerun and all(after[n]["attempts"] >= 1 and (root / n / "eval" / "metrics.json").is_file() for n in rerun)
    cut_short = [n for n in under_way if n not in evaluated]
    for n in cut_short:  # started over in a clean folder; or, where the killed sweep's Ray worker outlived it long
        # enough to finish the trial (a loaded machine: it notices its raylet is gone only later), counted as finished
        by_the_killed_sweep = (root / n / "eval" / "metrics.json").stat().st_mtime < resumed_at
        assert after[n]["attempts"] == 2 or (after[n]["attempts"] == 1 and by_the_killed_sweep), (before, after)
    print(f"killed after {len(done)} finished trials ({len(cut_short)} under way); the resume ran {len(rerun)}")
    assert all(n in resumed.stdout for n in after)  # the table lists every trial
    best = min(after.values(), key=lambda t: t["objective"])
    assert f"best config: {root / 'best.yaml'}" in resumed.stdout.replace("\n", "")
    assert yaml.safe_load((root / "best.yaml").read_text())["train"]["learning_rate"] == best["params"][
        "train.learning_rate"]
