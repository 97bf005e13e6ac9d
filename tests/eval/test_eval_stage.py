"""The eval stage on the tiny model: suites, systems, forgetting, judge, gate, report, CLI exit code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.cli_process import run_tunelab
from tests.conftest import animal_rows, tiny_run_config, write_jsonl
from tunelab import pipeline
from tunelab.config import JudgeConfig, SuiteConfig
from tunelab.eval.probes import PROBES


@pytest.fixture
def trained(tiny_config):
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    return tiny_config, run


EXTRA_REGEX = r"answer: \w+"
GATE = ["tuned.eval_loss < base.eval_loss", "extra/tuned.regex >= 0.75", "extra/base.regex > extra/tuned.regex",
        "forgetting.drop <= 0.5"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    """One trained run evaluated with everything the report shows: two suites, a compared run (trained for
    2 steps), forgetting probes and a gate. Shared by the stage test and the browser test of its report."""
    folder = tmp_path_factory.mktemp("evaluated")
    cfg = tiny_run_config(folder, tiny_model_dir)
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    other = cfg.model_copy(deep=True)
    other.output.dir = folder / "other-run"
    other.train.max_steps = 2
    pipeline.stage_train(other, pipeline.open_run(other, starting_training=True))

    extra = write_jsonl(folder / "extra.jsonl", animal_rows(4, start=500))
    cfg.eval.suites = [SuiteConfig(), SuiteConfig(name="extra", files=[extra], metrics=["exact_match", "bleu", "regex"],
                                                  regex=EXTRA_REGEX)]
    cfg.eval.compare_runs = [other.output.dir]
    cfg.eval.forgetting = True
    cfg.eval.gate = GATE
    return cfg, run, pipeline.stage_eval(cfg, run)


def expected_gate(metrics: dict, rows: list[dict]) -> list[bool]:
    """GATE's verdicts, from the answers themselves where the test can recount them."""
    extra = [r for r in rows if r["suite"] == "extra"]
    regex = {s: sum(bool(re.search(EXTRA_REGEX, r["outputs"][s])) for r in extra) / len(extra) for s in ("base", "tuned")}
    loss = {s: metrics["suites"]["test"]["systems"][s]["eval_loss"] for s in ("base", "tuned")}
    forgetting = metrics["forgetting"]
    drop = forgetting["base"]["overall"] - forgetting["tuned"]["overall"]
    return [loss["tuned"] < loss["base"], regex["tuned"] >= 0.75, regex["base"] > regex["tuned"], drop <= 0.5]


def test_suites_systems_forgetting_and_compare_runs(evaluated):
    cfg, run, result = evaluated
    metrics = result.metrics
    assert metrics["systems"] == ["base", "few_shot", "tuned", "other-run"]
    assert set(metrics["suites"]) == {"test", "extra"}
    assert set(metrics["suites"]["extra"]["systems"]["tuned"]) == {"exact_match", "regex", "bleu", "mean_words"}
    assert metrics["suites"]["test"]["n_examples"] == 8 and metrics["suites"]["extra"]["n_examples"] == 4
    forgetting = metrics["forgetting"]
    assert forgetting["n_probes"] == len(PROBES) == 100
    assert set(forgetting["base"]) == {"arithmetic", "facts", "instructions", "formats", "overall"}
    assert forgetting["drop"] == pytest.approx(forgetting["base"]["overall"] - forgetting["tuned"]["overall"])
    # The gate's verdicts are the ones recounted from the answers; the run learned the answer format and the
    # random base did not, so one rule fails and the gate with it.
    expected = expected_gate(metrics, result.rows)
    assert [g["passed"] for g in metrics["gate"]] == expected
    assert expected == [True, True, False, True] and result.gate_passed is False
    # The compared run really is a different model.
    rows = [r for r in result.rows if r["suite"] == "test"]
    loss = {s: metrics["suites"]["test"]["systems"][s]["eval_loss"] for s in ("tuned", "other-run", "base")}
    assert len(set(loss.values())) == 3 and len(rows) == 8
    html = (run.eval / "report.html").read_text()
    for needle in ("Forgetting probes", "Loss curves", "Gate", "Examples (regressions first)"):
        assert needle in html
    assert "<script" not in html and "src=" not in html and "<link" not in html  # self-contained, offline


CHARTS_JS = """[...document.querySelectorAll('svg')].map(svg => {
    const box = svg.getBoundingClientRect();
    const drawn = [...svg.querySelectorAll('rect, polyline, circle')].filter(m => {
        const b = m.getBoundingClientRect(); return b.width > 0 && b.height > 0; });
    const grid = [...svg.querySelectorAll('line.grid')].map(l => l.getBoundingClientRect().top);
    const bars = Object.fromEntries([...svg.querySelectorAll('rect')].filter(r => r.querySelector('title'))
        .map(r => [r.querySelector('title').textContent.split(':')[0], r.getBoundingClientRect().height]));
    const line = svg.querySelector('polyline');
    return {label: svg.getAttribute('aria-label'), width: box.width, height: box.height, right: box.right,
            drawn: drawn.length, grid, bars, points: line ? line.points.numberOfItems : 0};
})"""


def test_report_renders_in_chromium(evaluated, browser):
    """eval/report.html in a real browser: it loads nothing else and logs no error; every chart is drawn at a
    real size inside the page, bars to scale, the loss curve with one point per logged step, the gate's
    verdicts as recounted."""
    cfg, run, result = evaluated
    metrics = result.metrics
    page = (run.eval / "report.html").resolve().as_uri()
    browser.load(page)
    assert browser.page_errors() == []
    assert browser.requested_urls() == [page]  # self-contained: no script, style, font or image fetched
    assert browser.evaluate("document.title") == f"tunelab eval: {run.root.name}"
    viewport = browser.evaluate("document.documentElement.clientWidth")
    assert browser.evaluate("document.documentElement.scrollWidth") <= viewport  # no sideways scrolling

    charts = {c["label"]: c for c in browser.evaluate(CHARTS_JS)}
    per_suite = [f"{suite}: {metric}" for suite, r in metrics["suites"].items()
                 for metric in r["systems"]["tuned"] if metric != "perplexity"]
    assert list(charts) == [*per_suite, "training and validation loss", "pass rate per category"]
    for label, chart in charts.items():
        assert chart["width"] > 100 and chart["height"] > 100 and chart["right"] <= viewport, label
        assert chart["drawn"] > 0, label
    regex = charts["extra: regex"]
    zero, full = regex["grid"][0], regex["grid"][-1]  # the 0% and 100% gridlines
    for system, value in metrics["suites"]["extra"]["systems"].items():
        assert regex["bars"][system] == pytest.approx(value["regex"] * (zero - full), abs=0.6), system
    logged = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert charts["training and validation loss"]["points"] == sum("loss" in row for row in logged) == 12

    shown = browser.evaluate("[...document.querySelectorAll('span.pass, span.fail')].map(s => s.textContent)")
    assert shown == ["PASS" if ok else "FAIL" for ok in expected_gate(metrics, result.rows)]


def test_few_shot_prompts_show_training_examples(trained):
    from tunelab.chat import render_prompt
    from tunelab.data.prepare import load_dataset
    from tunelab.eval.systems import few_shot_examples
    from tunelab.eval.systems import with_shots as _with_shots
    from tunelab.models import load_tokenizer

    cfg, run = trained
    shots = few_shot_examples(load_dataset(run.data).train, 2, seed=0)
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant"]
    question = [{"role": "user", "content": "Extract the animal: on day 9999 I saw a owl."}]
    prompt = render_prompt(load_tokenizer(run.adapter), _with_shots(question, shots))
    assert prompt.count("<|im_start|>user") == 3 and prompt.index(shots[0]["content"]) < prompt.index("day 9999")
    assert few_shot_examples(load_dataset(run.data).train, 2, seed=0) == shots  # seeded


def test_the_few_shot_eval_loss_scores_the_reference_answer_only(trained):
    """The few-shot prompt's example answers are context: scoring them too made few-shot's eval_loss a mean over
    the demonstrations and the answer, not comparable with base and tuned."""
    from tunelab.data.prepare import load_dataset
    from tunelab.data.records import Record
    from tunelab.eval.run import loss_examples
    from tunelab.eval.systems import few_shot_examples
    from tunelab.eval.systems import with_shots as _with_shots
    from tunelab.models import load_tokenizer

    cfg, run = trained
    tokenizer = load_tokenizer(run.adapter)
    shots = few_shot_examples(load_dataset(run.data).train, 2, seed=0)
    record = Record("q", "t", "chat", [{"role": "user", "content": "Extract the animal: I saw a owl."},
                                       {"role": "assistant", "content": "answer: owl"}])
    [alone] = loss_examples(tokenizer, [record], [record.messages[:-1]], [])
    [with_demos] = loss_examples(tokenizer, [record], [_with_shots(record.messages[:-1], shots)], shots)
    scored = [[t for t in ex["labels"] if t != -100] for ex in (alone, with_demos)]
    assert scored[0] == scored[1] and tokenizer.decode(scored[1]).startswith("answer: owl")
    assert len(with_demos["input_ids"]) > len(alone["input_ids"]) + 10  # the demonstrations are in the prompt


def test_few_shot_examples_are_dropped_until_the_prompt_fits_the_context():
    from tunelab.eval.systems import fit_shots

    shots = [{"role": role, "content": text} for text, role in zip(
        ["q1", "a1", "q2", "a2", "q2b", "a2b", "q3", "a3"], ["user", "assistant"] * 4)]
    question = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q"}]
    assert fit_shots(question, shots, lambda c: True) == ([question[0], *shots, question[1]], 4)
    shown, kept = fit_shots(question, shots, lambda c: len(c) <= 6)  # room for two shots
    assert kept == 2 and [m["content"] for m in shown] == ["s", "q1", "a1", "q2", "a2", "Q"]
    assert fit_shots(question, shots, lambda c: False) == (question, 0)  # not even one: the question alone


def test_few_shot_prompts_past_the_model_context_are_shown_fewer_examples(trained, capsys):
    cfg, run = trained
    cfg = cfg.model_copy(deep=True)
    cfg.eval.systems, cfg.eval.few_shot_k, cfg.eval.max_examples, cfg.eval.forgetting = ["few_shot"], 200, 3, False
    cfg.track.enabled = False
    metrics = pipeline.stage_eval(cfg, run).metrics
    mean_shots = metrics["suites"]["test"]["systems"]["few_shot"]["mean_shots"]
    assert 0 < mean_shots < 100  # the tiny model has 512 positions: far fewer than the train split's rows fit
    warned = " ".join(capsys.readouterr().err.split())
    assert "few-shot prompts would not fit the model's context of 512 tokens" in warned


class _Judge(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible endpoint that scores 5 when the answer contains the reference, else 1."""

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        reference = text.split("Reference answer:\n")[1].split("\n")[0]
        answer = text.split("Answer to score:\n")[1].split("\n\nReply")[0]
        score = "5" if reference.lower() in answer.lower() else "1"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": score}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_llm_judge_scores_each_system_through_an_openai_compatible_endpoint(trained):
    cfg, run = trained
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg.eval.systems = ["base", "tuned"]
        cfg.eval.judge = JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="judge",
                                     max_examples=8)
        result = pipeline.stage_eval(cfg, run)
    finally:
        server.shutdown()
    judge = result.metrics["judge"]
    assert set(judge) == {"base", "tuned"} and judge["tuned"]["n"] == 8
    expected = {s: sum(5 if r["reference"].lower() in r["outputs"][s].lower() else 1 for r in result.rows) / 8
                for s in ("base", "tuned")}
    assert judge["base"]["mean"] == expected["base"] and judge["tuned"]["mean"] == expected["tuned"]


def test_cli_eval_exits_non_zero_when_the_gate_fails(trained):
    cfg, run = trained
    env = {**os.environ, "COLUMNS": "200"}
    command = ["eval", str(run.root), "--set", "eval.systems=[base, tuned]"]
    failing = run_tunelab(*command, "--set", "eval.gate=['tuned.exact_match >= base.exact_match + 2']", env=env)
    assert failing.returncode == 1, failing.stderr[-2000:]
    assert re.search(r"gate failed: tuned.exact_match >= base.exact_match \+ 2 \(measured \d\.\d{4}, "
                     r"needed >= 2\.\d{4}\)", failing.stderr), failing.stderr[-2000:]
    passing = run_tunelab(*command, "--set", "eval.gate=['tuned.eval_loss <= base.eval_loss']", env=env)
    assert passing.returncode == 0, passing.stderr[-2000:]
    assert json.loads((run.eval / "metrics.json").read_text())["gate"][0]["passed"] is True


def test_the_default_gate_applies_when_the_config_names_none(trained):
    cfg, run = trained
    env = {**os.environ, "COLUMNS": "200"}
    # tiny_config switches the gate off; `eval.gate=null` is a config that never mentioned it.
    done = run_tunelab("eval", str(run.root), "--set", "eval.gate=null", "--set", "eval.systems=[base, tuned]", env=env)
    metrics = json.loads((run.eval / "metrics.json").read_text())
    assert metrics["gate_source"] == "default"
    assert [g["rule"] for g in metrics["gate"]] == ["tuned.exact_match > base.exact_match"]
    systems = metrics["suites"]["test"]["systems"]
    beats_base = systems["tuned"]["exact_match"] > systems["base"]["exact_match"]
    assert done.returncode == (0 if beats_base else 1), done.stderr[-2000:]
    assert "The default rules" in (run.eval / "report.html").read_text()


def test_base_answers_are_reused_across_evals_of_the_same_base_and_tuned_ones_never(trained, tmp_path):
    cfg, run = trained
    cfg.model.cache_dir = tmp_path / "cache"
    first = pipeline.stage_eval(cfg, run)
    entries = sorted((tmp_path / "cache" / "eval").glob("answers-*.json"))
    assert len(entries) == 2  # base and few_shot on the test suite; tuned answers are never cached
    by_answers = {tuple(json.loads(e.read_text())): e for e in entries}
    base_answers = tuple(r["outputs"]["base"] for r in first.rows)
    assert base_answers in by_answers
    # Plant different answers under the base's key: a second eval must read them instead of generating.
    planted = [f"planted {i}" for i in range(len(base_answers))]
    by_answers[base_answers].write_text(json.dumps(planted))
    second = pipeline.stage_eval(cfg, run)
    assert [r["outputs"]["base"] for r in second.rows] == planted
    assert [r["outputs"]["tuned"] for r in second.rows] == [r["outputs"]["tuned"] for r in first.rows]
    cfg.eval.cache_base_answers = False
    third = pipeline.stage_eval(cfg, run)
    assert tuple(r["outputs"]["base"] for r in third.rows) == base_answers


def test_chat_answers_with_base_and_tuned_side_by_side(trained):
    cfg, run = trained
    lines = "Extract the animal: on day 4242 I saw a cat.\n/reset\n\nExtract the animal: on day 7 I saw a fox.\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(run.root), "--side-by-side",
                             "--max-new-tokens", "8"], input=lines, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    replies = [line for line in result.stdout.splitlines() if line.startswith(("base> ", "tuned> "))]
    assert [r.split(">")[0] for r in replies] == ["base", "tuned", "base", "tuned"]
    assert "(new conversation)" in result.stdout


def test_a_gate_rule_on_an_unmeasured_number_keeps_the_eval(trained):
    from tunelab.errors import ConfigError

    cfg, run = trained
    cfg.eval.systems = ["base", "tuned"]
    cfg.eval.gate = ["tuned.rouge_2 >= 0.5"]
    with pytest.raises(ConfigError, match="'tuned.rouge_2' was not measured"):
        pipeline.stage_eval(cfg, run)
    assert json.loads((run.eval / "metrics.json").read_text())["suites"]["test"]["n_examples"] == 8


def test_few_shot_examples_are_task_rows_never_rehearsal_rows():
    from tunelab.data.records import Record
    from tunelab.eval.systems import few_shot_examples

    def chat(i: int, replay: bool) -> Record:
        turns = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        return Record(f"r{i}", "t", "chat", turns,
                      meta={"replay": "self"} if replay else {})

    train = [chat(i, replay=i % 4 != 0) for i in range(40)]  # three rehearsal rows to each task row
    for seed in range(5):
        shown = {t["content"] for t in few_shot_examples(train, 4, seed) if t["role"] == "user"}
        assert len(shown) == 4 and shown <= {f"q{i}" for i in range(0, 40, 4)}


def test_base_answers_of_a_quantized_base_are_cached_apart(tiny_model_dir, tmp_path):
    """QLoRA evaluates an NF4 base: its answers are not the float base's, though its embeddings are the same."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelab.eval.run import _answers
    from tunelab.eval.systems import Models, System
    from tunelab.models import load_tokenizer

    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    models = Models(net, None)
    models.answer_cache = (tmp_path / "cache", "tiny-base")
    prompts = ["Extract the animal: I saw a cat.", "Extract the animal: I saw a fox."]

    def answers() -> list[str]:
        return _answers(models, System("base"), net, tokenizer, prompts, 4, 2, label="test")

    first = answers()
    (entry,) = (tmp_path / "cache").glob("answers-*.json")
    entry.write_text(json.dumps(["planted", "planted"]))
    assert answers() == ["planted", "planted"]  # the same float base: read from the cache
    net.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert answers() == first  # another key: generated, not the float base's entry
    assert len(list((tmp_path / "cache").glob("answers-*.json"))) == 2


def test_a_suite_file_that_repeats_training_rows_is_caught(trained, tmp_path):
    from tunelab.data.prepare import load_dataset
    from tunelab.errors import DataError

    cfg, run = trained
    cfg = cfg.model_copy(deep=True)
    cfg.eval.systems, cfg.eval.forgetting, cfg.eval.gate = ["tuned"], False, []
    seen = [r.to_json() for r in load_dataset(run.data).train[:2]]  # copied from what the run trained on
    fresh = [{"messages": [{"role": "user", "content": f"Extract the animal: on day {d} a heron flew over the lake."},
                           {"role": "assistant", "content": "heron"}]} for d in (90001, 90002)]
    suite = write_jsonl(tmp_path / "suite.jsonl", [{"messages": r["messages"]} for r in seen] + fresh)
    cfg.eval.suites[0].files = [suite]
    with pytest.raises(DataError, match=r"eval suite 'test': 2 examples overlap the training data: .*suite.jsonl:1 ~ "
                                        r"training row"):
        pipeline.stage_eval(cfg, run)
    cfg.data.contamination.action = "drop"
    assert pipeline.stage_eval(cfg, run).metrics["suites"]["test"]["n_examples"] == 2  # the fresh rows alone


def test_few_shot_examples_of_preference_and_kto_rows_show_their_good_answers():
    from tunelab.data.records import Record
    from tunelab.eval.systems import few_shot_examples

    prompt = [{"role": "user", "content": "q"}]
    pair = Record("p", "t", "preference", prompt, chosen="good", rejected="bad")
    liked = Record("k1", "t", "kto", prompt, completion="fine", label=True)
    disliked = Record("k2", "t", "kto", prompt, completion="awful", label=False)
    assert few_shot_examples([pair], 3, seed=0) == [*prompt, {"role": "assistant", "content": "good"}]
    assert few_shot_examples([liked, disliked], 3, seed=0) == [*prompt, {"role": "assistant", "content": "fine"}]
