"""Sweep specs: the search space, the trial list, and every bad spec refused in one line before a trial starts
(no Ray, no weights: these run in a second)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.cli_process import run_tunelab
from tunelab.errors import ConfigError
from tunelab.sweep.goals import direction
from tunelab.sweep.plan import Flags
from tunelab.sweep.run import plan_sweep
from tunelab.sweep.space import Distribution, draw_trials, parse_flag

ROOT = Path(__file__).resolve().parents[2]


def test_flags_read_lists_nested_lists_and_distributions():
    assert parse_flag("train.learning_rate=1e-4,3e-4") == ("train.learning_rate", [1e-4, 3e-4])
    assert parse_flag("method.r=8, 16") == ("method.r", [8, 16])
    assert parse_flag("method.target_modules=[q_proj,v_proj],all-linear") == (
        "method.target_modules", [["q_proj", "v_proj"], "all-linear"])
    assert parse_flag("method.use_dora=true,false") == ("method.use_dora", [True, False])
    assert parse_flag("train.learning_rate=loguniform(1e-5, 1e-3)") == (
        "train.learning_rate", Distribution("loguniform", 1e-5, 1e-3))
    assert parse_flag("method.r=randint(4,32)")[1] == Distribution("randint", 4, 32)


@pytest.mark.parametrize("flag,message", [
    ("train.learning_rate=", "--param train.learning_rate: no values given"),
    ("train.learning_rate=1e-4,,3e-4", "an empty value"),
    ("train.learning_rate=loguniform(1e-3,1e-5)", "empty range 'loguniform(1e-3,1e-5)'; LOW must be below HIGH"),
    ("train.warmup_ratio=uniform(0.1,0.1)", "empty range"),
    ("train.learning_rate=loguniform(0,1e-3)", "loguniform needs LOW above 0"),
    ("method.r=randint(4,8.5)", "randint takes whole numbers"),
    ("train.learning_rate=normal(0,1)", "cannot read 'normal(0,1)'"),
    ("method.r=8,8", "the value 8 is listed twice"),
    ("=1,2", "expected KEY=v1,v2"),
])
def test_bad_flags_are_one_line_errors(flag, message):
    with pytest.raises(ConfigError) as info:
        parse_flag(flag)
    (problem,) = info.value.problems
    assert message in problem


def test_grid_order_is_fixed_and_random_draws_are_seeded_and_in_range():
    space = {"a": [1, 2], "b": ["x", "y", "z"]}
    assert draw_trials(space, "grid", 6, 0) == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]
    ranged = {"lr": Distribution("loguniform", 1e-5, 1e-3), "r": Distribution("randint", 4, 6), "b": ["x", "y"]}
    first, again = draw_trials(ranged, "random", 50, 7), draw_trials(ranged, "random", 50, 7)
    assert first == again and first != draw_trials(ranged, "random", 50, 8)
    assert all(1e-5 <= t["lr"] <= 1e-3 and t["r"] in (4, 5, 6) and t["b"] in ("x", "y") for t in first)
    assert {t["r"] for t in first} == {4, 5, 6}  # both ends included
    distinct = draw_trials(space, "random", 6, 0)  # random over lists only: no combination twice
    assert len({tuple(t.values()) for t in distinct}) == 6


def test_direction_follows_the_metric_unless_told():
    assert direction("tuned.exact_match", "auto") == "max"
    assert direction("tuned.eval_loss", "auto") == "min"
    assert direction("forgetting.drop", "auto") == "min"
    assert direction("forgetting.facts_drop", "auto") == "min"
    assert direction("test/tuned.perplexity", "auto") == "min"
    assert direction("tuned.eval_loss", "max") == "max"


def test_a_plan_gives_every_trial_an_ordinary_config_of_its_own(tiny_config):
    tiny_config.train.eval_steps = 4
    plan = plan_sweep(tiny_config, Flags(params=["train.learning_rate=1e-3,1e-2", "method.r=4,8"]))
    assert plan.search == "grid" and len(plan.trials) == 4 and plan.mode == "max"
    assert plan.early_stopping and plan.grace_steps == 4  # on by default once val loss is measured while training
    names = [t.name for t in plan.trials]
    assert names[0] == "trial-000-learning_rate=0.001-r=4" and names[3] == "trial-003-learning_rate=0.01-r=8"
    third = plan.trials[2].config
    assert third.train.learning_rate == 1e-2 and third.method.r == 4
    assert third.output.dir == Path(tiny_config.output.dir).resolve() / names[2]
    assert third.sweep.params == {}  # a trial is an ordinary run: it does not sweep again
    assert plan.trials[2].config.train.max_steps == tiny_config.train.max_steps

    random = plan_sweep(tiny_config, Flags(params=["train.learning_rate=loguniform(1e-4,1e-2)"], samples=3))
    assert random.search == "random" and len(random.trials) == 3


def _problems(cfg, flags: Flags) -> list[str]:
    with pytest.raises(ConfigError) as info:
        plan_sweep(cfg, flags)
    return info.value.problems


@pytest.mark.parametrize("flags,expected", [
    (Flags(params=["train.learnin_rate=1e-4,1e-3"]),
     "--param train.learnin_rate: unknown key 'train.learnin_rate'; did you mean 'train.learning_rate'?"),
    (Flags(params=["trian.learning_rate=1e-4"]), "--param trian.learning_rate: unknown key 'trian'"),
    (Flags(params=["output.dir=a,b"]), "--param output.dir: output.* cannot be swept"),
    (Flags(params=["train.learning_rate=1e-3,-1"]),
     "--param train.learning_rate: 'train.learning_rate': input should be greater than 0, got -1"),
    (Flags(params=["train.early_stopping_patience=2,3"]),  # fine with an eval_steps value, but none is set or swept
     "sweep trial 0 (train.early_stopping_patience=2): train.early_stopping_patience needs train.eval_steps"),
    (Flags(params=["method.r=4,8"], samples=3), "samples (--samples) applies to random search"),
    (Flags(params=["method.r=4,8"], search="random", samples=5), "more than the 2 distinct combinations"),
    (Flags(params=["method.r=4,8"], constraints=["forgetting.drop <= 0.03"]),
     "--constraint: 'forgetting.drop <= 0.03': 'forgetting.drop' is not measured (forgetting probes off, or no such "
     "number) (eval.forgetting is off; set it to true to measure forgetting)"),
    (Flags(params=["method.r=4,8"], objective="few_shot.exact_match"),
     "--objective: 'few_shot.exact_match': 'few_shot.exact_match' was not measured (suites: test; systems: base, "
     "tuned)"),
    (Flags(params=["method.r=4,8"], objective="holdout/tuned.exact_match"), "'holdout/tuned.exact_match' was not"),
    (Flags(params=["method.r=4,8"], objective="tuned.bleu"), "'tuned.bleu' was not measured"),
    (Flags(params=["method.r=4,8"], objective="exact match"), "--objective: 'exact match' is not a metric name"),
    (Flags(params=["method.r=4,8"], constraints=["tuned.exact_match >> 0.5"]), "cannot read rule"),
    (Flags(params=["method.r=4,8"], early_stopping=True), "sweep.early_stopping: ASHA compares trials on val loss"),
    (Flags(), "sweep: nothing to sweep"),
])
def test_bad_sweep_specs_fail_before_any_trial(tiny_config, flags, expected):
    tiny_config.eval.systems = ["base", "tuned"]
    problems = _problems(tiny_config, flags)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_constraint_on_a_metric_only_some_trials_measure_is_refused(tiny_config):
    # The swept key turns the forgetting probes off in half the trials: their drop would never be measured.
    tiny_config.eval.forgetting = True
    problems = _problems(tiny_config, Flags(params=["eval.forgetting=true,false"],
                                            constraints=["forgetting.drop <= 0.03"]))
    assert "is not measured" in problems[0] and len(problems) == 1


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def test_a_sweep_refuses_to_register_since_it_would_not_know_which_trial(tiny_config):
    tiny_config.track.register_as = "animals"
    problems = _problems(tiny_config, Flags(params=["method.r=4,8"]))
    assert problems == ["track.register_as: a sweep registers no trial; once it ends, register the one you choose: "
                        "tunelab registry register SWEEP_DIR/TRIAL --name NAME"]


@pytest.mark.parametrize("args,expected", [
    (["--param", "train.learnin_rate=1e-4,1e-3"], "did you mean 'train.learning_rate'?"),
    (["--param", "method.r=4,8", "--constraint", "forgetting.drop <= 0.03"], "eval.forgetting is off"),
    (["--param", "train.learning_rate=loguniform(1e-3,1e-5)"], "empty range"),
])
def test_the_command_refuses_a_bad_spec_in_one_line_and_writes_nothing(tiny_config, tmp_path, args, expected):
    config = _write(tiny_config, tmp_path / "sweep.yaml")
    out = Path(tiny_config.output.dir)
    result = run_tunelab("sweep", str(config), *args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "Ray" not in result.stderr
    assert not out.exists()


def test_dry_run_lists_the_trials(tiny_config, tmp_path):
    config = _write(tiny_config, tmp_path / "sweep.yaml")
    result = run_tunelab("sweep", str(config), "--param", "train.learning_rate=loguniform(1e-4,1e-2)", "--samples",
                         "3", "--dry-run", cwd=ROOT, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1",
                         "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "random search over train.learning_rate in loguniform(0.0001, 0.01)" in result.stdout
    assert result.stdout.count("trial-00") == 3 and not Path(tiny_config.output.dir).exists()


def test_keys_checked_together_are_fine_when_swept_together(tiny_config):
    # Early-stopping patience alone needs eval_steps; swept with it, every trial has both.
    plan = plan_sweep(tiny_config, Flags(params=["train.early_stopping_patience=2,3", "train.eval_steps=4"],
                                         early_stopping=False))
    assert [t.config.train.early_stopping_patience for t in plan.trials] == [2, 3]


def test_the_sweep_folder_is_never_clobbered_and_resume_checks_what_it_finishes(tiny_config, tmp_path):
    from tunelab.errors import RunFolderError
    from tunelab.sweep.folder import open_sweep, start_sweep
    from tunelab.sweep.state import SweepState

    flags = Flags(params=["train.learning_rate=1e-3,1e-2"])
    plan = plan_sweep(tiny_config, flags)
    root = plan.root
    start_sweep(plan, open_sweep(plan, resume=False))
    assert (root / "sweep.json").is_file() and (root / "data" / "train.jsonl").is_file()
    with pytest.raises(RunFolderError, match="already holds a sweep .*pass --resume"):
        open_sweep(plan, resume=False)

    # Killed with trial 0 evaluated but not yet recorded, and trial 1 half-trained: resume keeps 0, reruns 1.
    state = SweepState.load(root)
    for record in state.trials:
        record.status = "running"
    state.save()
    (root / plan.trials[0].name / "eval").mkdir(parents=True)
    (root / plan.trials[0].name / "eval" / "metrics.json").write_text("{}")
    resumed = open_sweep(plan_sweep(tiny_config, Flags(), resume=True), resume=True)  # no flags: from sweep.json
    assert [t.status for t in resumed.trials] == ["finished", "pending"]

    changed = tiny_config.model_copy(deep=True)
    changed.train.max_steps = 20
    with pytest.raises(ConfigError, match=r"--resume: the config differs .*train.max_steps: 12 -> 20"):
        open_sweep(plan_sweep(changed, Flags(), resume=True), resume=True)
    with pytest.raises(ConfigError, match="draw other trials than sweep.json holds"):
        open_sweep(plan_sweep(tiny_config, Flags(params=["train.learning_rate=1e-3,3e-2"]), resume=True), resume=True)
    # The goal may change on resume: the same trials are ranked again.
    regoal = plan_sweep(tiny_config, Flags(objective="tuned.token_f1"), resume=True)
    assert open_sweep(regoal, resume=True).spec["objective"] == "tuned.token_f1"

    other = tiny_config.model_copy(deep=True)
    other.output.dir = tmp_path / "nothing-here"
    with pytest.raises(RunFolderError, match="holds no sweep to resume"):
        open_sweep(plan_sweep(other, flags, resume=True), resume=True)


def test_a_new_sweep_whose_data_fails_leaves_no_folder(tiny_config, tmp_path):
    from tunelab.errors import DataError
    from tunelab.sweep.folder import open_sweep, start_sweep

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    tiny_config.data.train = [tiny_config.data.train[0].model_copy(update={"path": bad})]
    plan = plan_sweep(tiny_config, Flags(params=["method.r=4,8"]))
    with pytest.raises(DataError):
        start_sweep(plan, open_sweep(plan, resume=False))
    assert not plan.root.exists()
