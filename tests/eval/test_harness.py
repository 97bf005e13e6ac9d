"""eval.harness: lm-evaluation-harness tasks scored for real on base and tuned, through the eval stage and the CLI.

The local task (tests/eval/harness_task/) asks which animal a sentence names, the question the tiny model is
trained on, so the adapter moves its answers: base and tuned must differ, and each must equal an independent
computation of the same multiple-choice accuracy on the same model with the adapter off and on.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.cli_process import run_tunelab
from tunelab import pipeline
from tunelab.config_file import dump_config
from tunelab.config_harness import HarnessConfig
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "tests" / "eval" / "harness_task"
TASK = "tunelab_animals"


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, tiny_model_dir):
    """One trained run for the module (training is the slow part): the tiny task, 24 steps for a strong adapter
    whose answers move away from the base ones."""
    from tests.conftest import animal_rows, write_jsonl
    from tunelab.config_file import validate_config

    folder = tmp_path_factory.mktemp("harness")
    cfg = validate_config({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(write_jsonl(folder / "train.jsonl", animal_rows(48))),
                 "test": str(write_jsonl(folder / "test.jsonl", animal_rows(8, seed=1, start=1000))),
                 "val_fraction": 0.1},
        "train": {"learning_rate": 1e-2, "max_steps": 24, "batch_size": 8, "warmup_ratio": 0.0, "seed": 1},
        "eval": {"systems": ["base", "tuned"], "suites": [{"metrics": ["exact_match"], "max_examples": 2}],
                 "max_new_tokens": 6, "batch_size": 4, "forgetting": False},
        "track": {"enabled": False},
        "output": {"dir": str(folder / "run")},
    })
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    return cfg, run


@pytest.fixture
def trained(trained_once, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the working folder, as lm-eval reads it
    cfg, run = trained_once
    return cfg.model_copy(deep=True), run


def _independent_accuracy(cfg, run, adapter_on: bool) -> float:
    """Multiple-choice accuracy as lm-eval defines it (the choice with the highest summed log-probability after
    the chat-rendered question), computed here with plain torch on the run's model."""
    import torch

    from tunelab.chat import chat_tokenizer, render_prompt
    from tunelab.models import Precision, resolve_model
    from tunelab.train.methods import load_trained

    model, _ = load_trained(cfg, run.root, resolve_model(cfg.model), Precision("cpu", None, torch.float32))
    tokenizer = chat_tokenizer(run.trained, cfg.data.chat_template)
    docs = [json.loads(line) for line in (TASK_DIR / "animals.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        context = render_prompt(tokenizer, [{"role": "user", "content": doc["question"]}])
        head = context.rstrip()  # lm-eval scores trailing whitespace of the context as part of the answer
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(head + context[len(head):] + choice, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
            with torch.no_grad(), (contextlib.nullcontext() if adapter_on else model.disable_adapter()):
                logits = model(torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
            scores.append(float(logprobs.gather(1, torch.tensor(whole[start:])[:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_benchmark_scores_for_base_and_tuned_enter_metrics_report_and_gate(trained):
    cfg, run = trained
    cfg.eval.harness = HarnessConfig(tasks=[TASK], include_path=[TASK_DIR], apply_chat_template=True)
    cfg.eval.gate = [f"harness.{TASK}.drop <= 1", f"harness.{TASK}.drop < -1", f"harness.{TASK}.tuned > harness.{TASK}.base"]
    result = pipeline.stage_eval(cfg, run)

    scores = json.loads((run.eval / "metrics.json").read_text())["harness"]["tasks"][TASK]
    assert scores["metric"] == "acc_norm,none"  # preferred over acc where the task reports both
    assert set(scores["numbers"]["base"]) == {"acc,none", "acc_norm,none"} and scores["n"] == 8
    assert 0.0 <= scores["base"] <= 1.0 and 0.0 <= scores["tuned"] <= 1.0
    assert scores["drop"] == pytest.approx(scores["base"] - scores["tuned"])
    # The adapter is really switched: base and tuned differ, and each equals the same model scored here
    # with its adapter off and on.
    assert scores["base"] != scores["tuned"]
    assert scores["base"] == pytest.approx(_independent_accuracy(cfg, run, adapter_on=False))
    assert scores["tuned"] == pytest.approx(_independent_accuracy(cfg, run, adapter_on=True))
    assert [g["passed"] for g in result.metrics["gate"]] == [True, False, scores["tuned"] > scores["base"]]
    assert result.metrics["gate"][0]["left"] == pytest.approx(scores["drop"])

    html = (run.eval / "report.html").read_text()
    assert "Standard benchmarks (lm-evaluation-harness)" in html and f"<td>{TASK}</td>" in html
    assert "benchmark scores" in html  # the bar chart
    markdown = (run.eval / "report.md").read_text()
    assert f"| {TASK} | acc_norm,none | {scores['base']:.4f}" in markdown
    manifest = json.loads(run.manifest.read_text())
    assert manifest["harness"][TASK]["drop"] == pytest.approx(scores["drop"])


def test_cli_eval_fails_on_a_harness_gate_rule_and_mlflow_gets_the_scores(trained):
    from mlflow import MlflowClient

    from tunelab.track import tracking_uri

    cfg, run = trained
    overrides = ["eval.systems=[base, tuned]", f"eval.harness.tasks=[{TASK}]",
                 f"eval.harness.include_path={TASK_DIR}", "eval.harness.limit=4", "track.enabled=true",
                 f"eval.gate=['harness.{TASK}.drop < -1']"]
    command = ["eval", str(run.root)]
    for override in overrides:
        command += ["--set", override]
    result = run_tunelab(*command, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"gate failed: harness.{TASK}.drop < -1 (measured" in result.stderr
    harness = json.loads((run.eval / "metrics.json").read_text())["harness"]
    assert harness["limit"] == 4 and harness["tasks"][TASK]["n"] == 4
    stamp = json.loads((run.root / "mlflow_run.json").read_text())
    cfg.track.enabled = True
    logged = MlflowClient(tracking_uri=tracking_uri(cfg)).get_run(stamp["run_id"]).data.metrics
    for number in ("base", "tuned", "drop"):
        assert logged[f"harness.{TASK}.{number}"] == pytest.approx(harness["tasks"][TASK][number])


def test_tasks_that_cannot_run_are_refused_before_any_weights_load(tiny_config, tmp_path):
    raw = yaml.safe_load(dump_config(tiny_config))
    raw["eval"]["harness"] = {"tasks": [TASK, "no_such_benchmark", "tunelab_hub_only"], "include_path": [str(TASK_DIR)]}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "400"}
    result = run_tunelab("run", str(config), "--dry-run", cwd=ROOT, env=offline)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert "'no_such_benchmark'" in errors[0] and "eval.harness.include_path" in errors[0]
    assert "'tunelab_hub_only' cannot load its dataset" in errors[1]
    assert "hub-hosted tasks need network access" in errors[1] and "eval.harness.include_path" in errors[1]


def test_run_checks_the_benchmarks_before_training(tiny_config, tmp_path):
    tiny_config.eval.harness = HarnessConfig(tasks=[TASK], include_path=[tmp_path / "no-such-folder"])
    with pytest.raises(ConfigError, match="eval.harness.include_path: .*no-such-folder does not exist"):
        pipeline.run_all(tiny_config)
    assert not Path(tiny_config.output.dir).exists()  # nothing trained, no run folder left behind


def test_task_scores_pick_the_published_number_and_point_drop_at_lost_ground():
    from tunelab.eval.harness import _task_scores

    def result(acc: float, ppl: float) -> dict:
        return {"results": {"gsm8k": {"exact_match,strict-match": acc, "exact_match,flexible-extract": acc + 0.1,
                                      "exact_match_stderr,strict-match": 0.01, "alias": "gsm8k"},
                            "wikitext": {"word_perplexity,none": ppl, "bits_per_byte,none": 0.5},
                            "mmlu": {"acc,none": acc, "acc_stderr,none": 0.02}},
                "higher_is_better": {"gsm8k": {"exact_match": True}, "wikitext": {"word_perplexity": False}},
                "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_astronomy"]},
                "n-samples": {"gsm8k": {"original": 1319, "effective": 50}, "mmlu_astronomy": {"effective": 152},
                              "mmlu_other": {"effective": 100}, "wikitext": {"effective": 62}}}

    base, tuned = result(0.5, 10.0), result(0.4, 12.0)
    gsm = _task_scores("gsm8k", base, tuned, None)
    assert gsm["metric"] == "exact_match,strict-match" and gsm["drop"] == pytest.approx(0.1) and gsm["n"] == 50
    assert gsm["base_stderr"] == 0.01
    assert _task_scores("gsm8k", base, tuned, "exact_match,flexible-extract")["base"] == pytest.approx(0.6)
    wiki = _task_scores("wikitext", base, tuned, "word_perplexity")
    assert wiki["higher_is_better"] is False and wiki["drop"] == pytest.approx(2.0)  # perplexity up: lost ground
    assert _task_scores("mmlu", base, tuned, None)["n"] == 252  # every document under the group
    missing = _task_scores("mmlu", base, tuned, "acc_norm")
    assert "drop" not in missing and "reports no 'acc_norm' (it reports acc,none)" in missing["error"]


def test_generation_tasks_end_at_the_templates_end_of_turn_on_a_base_model(tmp_path):
    """A base model given ChatML: lm-eval stops at the generation config's eos ids and at stop texts matched in
    text decoded without special tokens, so <|im_end|> must be among the eos ids while the harness runs."""
    from tests import model_zoo as zoo
    from tunelab.chat import setup_chat_template
    from tunelab.eval.harness import ending_turns
    from tunelab.models import Precision, load_model, load_tokenizer

    base = zoo.build_base_model(tmp_path / "base", arch="llama")
    tokenizer = load_tokenizer(base)
    setup_chat_template(tokenizer, "chatml")
    net = load_model(base, Precision("cpu", None, None))
    before = net.generation_config.eos_token_id
    with ending_turns(net, tokenizer):
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in net.generation_config.eos_token_id
        assert tokenizer.eos_token_id in net.generation_config.eos_token_id
    assert net.generation_config.eos_token_id == before
