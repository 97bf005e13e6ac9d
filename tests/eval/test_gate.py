"""Gate rules: parsed at config time, evaluated against the measured numbers."""

from __future__ import annotations

import json

import pytest

from tunelab.config import EvalConfig, SuiteConfig
from tunelab.config_file import validate_config
from tunelab.errors import ConfigError
from tunelab.eval.gate import evaluate_gate, gate_rules

METRICS = {
    "suites": {
        "test": {"systems": {"base": {"exact_match": 0.1}, "tuned": {"exact_match": 0.6}, "few_shot": {"exact_match": 0.3}}},
        "json": {"systems": {"tuned": {"json_valid": 0.9}}},
    },
    "forgetting": {"drop": 0.05, "facts_drop": 0.0},
}


def test_rules_compare_metrics_numbers_and_offsets():
    results = evaluate_gate([
        "tuned.exact_match >= base.exact_match + 0.2",
        "tuned.exact_match > few_shot.exact_match",
        "json/tuned.json_valid >= 0.95",
        "forgetting.drop <= 0.02",
        "forgetting.facts_drop <= 0",
    ], METRICS)
    assert [r.passed for r in results] == [True, True, False, False, True]
    assert (results[0].left, results[0].right) == (0.6, pytest.approx(0.3))
    assert results[3].describe() == "FAIL forgetting.drop <= 0.02  (0.0500 vs 0.0200)"


def test_rules_hold_within_float_rounding():
    # 0.1 + 0.2 is 0.30000000000000004 and 0.14 - 0.09 is 0.05000000000000002: equal as measured, so >= and <=
    # hold and > and < do not.
    metrics = {"suites": {"test": {"systems": {"base": {"exact_match": 0.1}, "tuned": {"exact_match": 0.3}}}},
               "forgetting": {"drop": 0.14 - 0.09}}
    results = evaluate_gate(["tuned.exact_match >= base.exact_match + 0.2", "forgetting.drop <= 0.05",
                             "tuned.exact_match > base.exact_match + 0.2", "forgetting.drop < 0.05",
                             "tuned.exact_match >= base.exact_match + 0.2000001"], metrics)
    assert [r.passed for r in results] == [True, True, False, False, False]


def test_unmeasured_numbers_are_named():
    with pytest.raises(ConfigError, match="'tuned.rouge_l' was not measured"):
        evaluate_gate(["tuned.rouge_l >= 0.5"], METRICS)
    with pytest.raises(ConfigError, match="'forgetting.drop' is not measured"):
        evaluate_gate(["forgetting.drop <= 0.1"], {"suites": METRICS["suites"], "forgetting": None})


def test_unreadable_rules_fail_at_config_time():
    with pytest.raises(ConfigError) as info:
        validate_config({"data": {"train": "a.jsonl"}, "eval": {"gate": ["tuned is better than base"]}})
    assert "eval.gate: cannot read rule 'tuned is better than base'" in info.value.problems[0]


def test_the_default_gate_asks_for_a_win_over_base_no_loss_to_few_shot_and_at_most_5_points_of_forgetting():
    rules, source = gate_rules(EvalConfig())
    assert source == "default"
    assert rules == ["tuned.exact_match > base.exact_match", "tuned.exact_match >= few_shot.exact_match",
                     "forgetting.drop <= 0.05"]
    assert all(r.passed for r in evaluate_gate(rules, METRICS))  # 0.6 > 0.1, 0.6 >= 0.3, drop 0.05
    tied = {"suites": {"test": {"systems": {"base": {"exact_match": 0.6}, "tuned": {"exact_match": 0.6},
                                            "few_shot": {"exact_match": 0.7}}}}, "forgetting": {"drop": 0.051}}
    assert [r.passed for r in evaluate_gate(rules, tied)] == [False, False, False]


def test_the_default_gate_follows_what_the_config_measures():
    loss_first = EvalConfig(suites=[SuiteConfig(metrics=["eval_loss", "exact_match"])], systems=["base", "tuned"],
                            forgetting=False)
    assert gate_rules(loss_first) == (["tuned.eval_loss < base.eval_loss"], "default")  # a loss must go down
    custom_first = EvalConfig(suites=[SuiteConfig(metrics=["mypkg.scores:score", "rouge_l"])], systems=["tuned"])
    assert gate_rules(custom_first) == ([], "default")  # the forgetting drop needs the base's pass rate too
    no_base = EvalConfig(systems=["tuned", "few_shot"], forgetting=True)
    assert gate_rules(no_base) == (["tuned.exact_match >= few_shot.exact_match"], "default")
    assert gate_rules(EvalConfig(systems=["base", "few_shot"], forgetting=True)) == ([], "default")


def test_an_empty_gate_switches_it_off_on_purpose_and_a_stated_gate_replaces_it():
    off = validate_config({"data": {"train": "a.jsonl"}, "eval": {"gate": []}})
    assert gate_rules(off.eval) == ([], "config")
    own = validate_config({"data": {"train": "a.jsonl"}, "eval": {"gate": ["tuned.rouge_l >= 0.5"]}})
    assert gate_rules(own.eval) == (["tuned.rouge_l >= 0.5"], "config")
    assert validate_config({"data": {"train": "a.jsonl"}}).eval.gate is None
def test_harness_rules_read_a_benchmark_task_base_tuned_and_drop():
    metrics = {**METRICS, "harness": {"tasks": {
        "mmlu": {"metric": "acc,none", "base": 0.30, "tuned": 0.27, "drop": 0.03},
        "longproc_countdown_0.5k": {"metric": "acc,none", "base": 0.5, "tuned": 0.5, "drop": 0.0}}}}
    results = evaluate_gate(["harness.mmlu.drop <= 0.02", "harness.mmlu.tuned >= harness.mmlu.base - 0.05",
                             "harness.longproc_countdown_0.5k.drop <= 0", "tuned.exact_match >= 0.5"], metrics)
    assert [r.passed for r in results] == [False, True, True, True]
    assert (results[0].left, results[1].right) == (0.03, pytest.approx(0.25))
    with pytest.raises(ConfigError, match=r"'harness.hellaswag.drop' is not measured \(measured: mmlu, longproc"):
        evaluate_gate(["harness.hellaswag.drop <= 0.02"], metrics)
    with pytest.raises(ConfigError, match="eval.harness is off"):
        evaluate_gate(["harness.mmlu.drop <= 0.02"], METRICS)
    with pytest.raises(ConfigError, match="a harness task has base, tuned and drop"):
        evaluate_gate(["harness.mmlu.metric <= 0.02"], metrics)
    assert validate_config({"data": {"train": "a.jsonl"}, "eval": {"gate": ["harness.mmlu.drop <= 0.02"]}})


def test_the_gate_passes_when_every_rule_holds_and_the_registry_tags_say_so():
    from tunelab.eval.result import gate_passed, gate_rows
    from tunelab.track import GATE_PASSED_TAG, gate_tags

    holding, _ = gate_rows(["tuned.exact_match >= base.exact_match + 0.2"], METRICS)
    broken, _ = gate_rows(["tuned.exact_match >= base.exact_match + 0.2", "forgetting.drop <= 0.02"], METRICS)
    assert gate_passed({**METRICS, "gate": holding}) and not gate_passed({**METRICS, "gate": broken})
    assert gate_passed({**METRICS, "gate": []})  # eval.gate: [] switches the gate off on purpose...
    assert gate_tags({**METRICS, "gate": []})[GATE_PASSED_TAG] == "false"  # ...but it is no evidence to promote on
    # A rule naming an unmeasured number is a failed row, never dropped with the rest of the gate.
    unread, error = gate_rows(["tuned.exact_match >= 0.1", "harness.mmlu.drop <= 0.02"], METRICS)
    assert [r["passed"] for r in unread] == [True, False] and "eval.harness is off" in unread[1]["error"]
    assert unread[1]["left"] is None  # metrics.json stays strict JSON (no NaN)
    assert error is not None and not gate_passed({**METRICS, "gate": unread})
    assert gate_tags({**METRICS, "gate": unread})[GATE_PASSED_TAG] == "false"
    assert gate_tags({**METRICS, "gate": broken}) == {GATE_PASSED_TAG: "false", "tunelab.gate": json.dumps(
        ["tuned.exact_match >= base.exact_match + 0.2", "forgetting.drop <= 0.02"])}
    assert gate_tags({**METRICS, "gate": holding})[GATE_PASSED_TAG] == "true"
    assert gate_tags(None) == {GATE_PASSED_TAG: "false"}  # never evaluated: no evidence to promote on
