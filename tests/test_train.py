"""Train and eval stages end to end on the tiny model: artifacts, reload, template, overwrite safety."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from tests.cli_process import run_tunelab
from tunelab import pipeline
from tunelab.artifacts import RunPaths
from tunelab.chat import render_prompt
from tunelab.errors import RunFolderError
from tunelab.models import load_tokenizer


@pytest.fixture
def trained(tiny_config):
    run = pipeline.open_run(tiny_config, starting_training=True)
    result = pipeline.stage_train(tiny_config, run)
    return tiny_config, run, result


def test_training_lowers_loss_and_writes_every_artifact(trained):
    cfg, run, result = trained
    assert result.steps == 12
    assert result.last_loss < result.first_loss * 0.8
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 13))
    assert rows[-1]["val_loss"] == pytest.approx(result.val_loss)
    for path in (run.config, run.chat_template, run.manifest, run.adapter / "adapter_config.json",
                 run.adapter / "adapter_model.safetensors", run.data / "train.jsonl"):
        assert path.is_file(), path
    assert yaml.safe_load(run.config.read_text())["train"]["max_steps"] == 12
    manifest = json.loads(run.manifest.read_text())
    assert manifest["train"]["steps"] == 12 and manifest["data"] == {"train": 43, "val": 5, "test": 8}


def test_adapter_reloads_with_plain_peft_to_identical_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run, result = trained
    base = AutoModelForCausalLM.from_pretrained(run_base(cfg), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, run.adapter).eval()
    ids = torch.tensor([[5, 17, 33, 2, 40, 41]])
    with torch.no_grad():
        a, b = result.model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            untouched = reloaded(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, untouched)  # the adapter really changes the model


def run_base(cfg):
    from tunelab.models import resolve_model

    return resolve_model(cfg.model)


def test_saved_template_renders_the_training_prompt(trained):
    cfg, run, _ = trained
    trained_tok = load_tokenizer(run.adapter)
    base_tok = load_tokenizer(run_base(cfg))
    messages = [{"role": "user", "content": "Extract the animal: I saw a owl today."}]
    assert run.chat_template.read_text() == base_tok.chat_template == trained_tok.chat_template
    assert render_prompt(trained_tok, messages) == render_prompt(base_tok, messages)


def test_eval_compares_base_few_shot_and_tuned(trained):
    cfg, run, _ = trained
    result = pipeline.stage_eval(cfg, run)
    systems = result.metrics["suites"]["test"]["systems"]
    assert set(systems) == {"base", "few_shot", "tuned"}
    assert systems["tuned"]["eval_loss"] < systems["base"]["eval_loss"]
    assert result.metrics["suites"]["test"]["n_examples"] == 8
    predictions = [json.loads(line) for line in (run.eval / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and set(predictions[0]["outputs"]) == {"base", "few_shot", "tuned"}
    report = (run.eval / "report.md").read_text()
    assert "| base |" in report and "| tuned |" in report
    assert (run.eval / "report.html").read_text().count("<svg") >= 3


def test_existing_run_is_never_overwritten_silently(trained):
    cfg, run, _ = trained
    with pytest.raises(RunFolderError, match="already holds a trained run"):
        pipeline.open_run(cfg, starting_training=True)
    assert (run.adapter / "adapter_model.safetensors").is_file()
    cfg.output.overwrite = True
    pipeline.open_run(cfg, starting_training=True)
    assert run.adapter.exists()  # nothing is removed before the new data validated
    pipeline.stage_data(cfg, run)
    assert not run.adapter.exists()


def test_cli_run_end_to_end_on_the_tiny_model(tiny_config, tmp_path):
    from tunelab.config_file import dump_config

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(dump_config(tiny_config))
    env = {**os.environ, "COLUMNS": "200"}
    result = run_tunelab("run", str(config_path), "--set", "train.max_steps=4", env=env)
    assert result.returncode == 0, result.stderr
    assert "test tuned exact_match (n=8)" in result.stdout
    run = RunPaths(tiny_config.output.dir)
    assert json.loads(run.manifest.read_text())["train"]["steps"] == 4


def test_dry_run_validates_everything_but_loads_no_weights(tiny_config, tiny_model_dir, tmp_path):
    import shutil

    from tunelab.config_file import dump_config

    # A model folder whose weights file is garbage: any attempt to load weights would fail.
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    config_path = tmp_path / "dry.yaml"
    config_path.write_text(dump_config(tiny_config).replace(str(tiny_model_dir), str(broken)))
    env = {**os.environ, "COLUMNS": "300"}
    result = run_tunelab("run", str(config_path), "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "43 train / 5 val / 8 test examples, all rows valid" in result.stdout
    config_text, checks = result.stdout.split("\nok ", 1)  # the resolved config, then the checks, last
    assert yaml.safe_load(config_text[config_text.index("model:\n"):])["method"]["r"] == 16
    assert checks.startswith("data: 43 train")
    assert not RunPaths(tiny_config.output.dir).adapter.exists()

    # ...while a bad data row fails the dry run with the file and line.
    train_file = tiny_config.data.train[0].path
    train_file.write_text(train_file.read_text() + '{"messages": []}\n')
    result = run_tunelab("run", str(config_path), "--dry-run", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {train_file}:49: field 'messages': expected a non-empty list of "
                                     "{role, content} objects")


def test_training_with_packing_sees_every_token_once_per_epoch(tiny_config):
    tiny_config.data.packing = True
    tiny_config.data.max_length = 128
    tiny_config.train.max_steps = None
    tiny_config.train.epochs = 1
    tiny_config.train.batch_size = 2
    run = pipeline.open_run(tiny_config, starting_training=True)
    result = pipeline.stage_train(tiny_config, run)
    from tunelab.chat import encode_records
    from tunelab.data.prepare import load_dataset

    examples, _ = encode_records(load_tokenizer(run.adapter), load_dataset(run.data).train, None, 128)
    assert result.tokens_seen == sum(len(e["input_ids"]) for e in examples)  # no padding, nothing twice
    assert result.steps < len(examples) / 2  # several examples per row
    assert result.last_loss < result.first_loss
