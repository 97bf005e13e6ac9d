"""Continued pre-training: raw text rows, loss on every token."""

from __future__ import annotations

from tests.conftest import write_jsonl
from tunelab import pipeline
from tunelab.config_file import validate_config
from tunelab.models import load_tokenizer
from tunelab.train.sft import encode_split


def test_cpt_trains_on_every_token(tmp_path, tiny_model_dir):
    rows = [{"text": f"On day {i} the quick brown fox jumps over the lazy dog near the river."} for i in range(40)]
    cfg = validate_config({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", rows))},
        "objective": "cpt",
        "train": {"learning_rate": 1e-2, "max_steps": 10, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    })
    run = pipeline.open_run(cfg, starting_training=True)
    result = pipeline.stage_train(cfg, run)
    assert result.last_loss < result.first_loss * 0.8
    tokenizer = load_tokenizer(tiny_model_dir)
    examples, _ = encode_split(cfg, tokenizer, pipeline.stage_data(cfg, run).dataset.train[:1])
    assert examples[0]["labels"] == examples[0]["input_ids"]  # every token is a target
    assert examples[0]["input_ids"][-1] == tokenizer.eos_token_id  # documents end, so the model learns to stop
