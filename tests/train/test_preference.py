"""Preference objectives on the tiny model, and TRL's DPO loss checked against the formula by hand."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_jsonl
from tunelab import pipeline
from tunelab.config_file import validate_config


def preference_rows(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"Name an animal for day {i}.", "chosen": f"answer: cat {i}",
             "rejected": f"answer: dog dog dog {i}"} for i in range(n)]


def kto_rows(n: int) -> list[dict]:
    return [{"id": f"k{i}", "prompt": f"Name an animal for day {i}.", "completion": f"answer: {'cat' if i % 2 else 'dog'}",
             "label": bool(i % 2)} for i in range(n)]


def make_config(tmp_path, tiny_model_dir, objective, rows, **objective_options):
    return validate_config({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(write_jsonl(tmp_path / f"{objective}.jsonl", rows)), "val_fraction": 0,
                 "test_fraction": 0.1},
        "method": {"dropout": 0.0},
        "objective": {"type": objective, **objective_options},
        "train": {"learning_rate": 5e-3, "max_steps": 8, "batch_size": 4, "save_steps": None},
        "output": {"dir": str(tmp_path / objective)},
    })


@pytest.mark.parametrize("objective,options", [
    ("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("simpo", {}), ("orpo", {}), ("kto", {}),
])
def test_objective_trains_and_logs_its_metrics(tmp_path, tiny_model_dir, objective, options):
    rows = kto_rows(24) if objective == "kto" else preference_rows(24)
    cfg = make_config(tmp_path, tiny_model_dir, objective, rows, **options)
    run = pipeline.open_run(cfg, starting_training=True)
    result = pipeline.stage_train(cfg, run)
    assert result.last_loss < result.first_loss
    assert (run.adapter / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in run.metrics.read_text().splitlines() if '"loss"' in line]
    if objective != "kto":
        assert {"rewards/margins", "rewards/accuracies"} <= set(logged[-1])


def test_sft_rows_are_refused_for_dpo(tmp_path, tiny_model_dir, tiny_config):
    from tunelab.errors import DataError

    rows = [{"messages": [{"role": "user", "content": f"q{i} about things"}, {"role": "assistant", "content": "a"}]}
            for i in range(10)]
    cfg = make_config(tmp_path, tiny_model_dir, "dpo", rows)
    with pytest.raises(DataError, match="objective.type: dpo needs preference rows"):
        pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True))


def test_dpo_loss_at_step_zero_matches_the_formula(tmp_path, tiny_model_dir):
    from peft import PeftModel

    from tunelab.models import Precision, load_tokenizer, resolve_model
    from tunelab.train.adapters import build_trainable
    from tunelab.train.preference import make_trainer, to_trl_rows

    beta = 0.3
    cfg = make_config(tmp_path, tiny_model_dir, "dpo", preference_rows(8), beta=beta)
    base = resolve_model(cfg.model)
    model = build_trainable(cfg, base, Precision("cpu", None, torch.float32))
    tokenizer = load_tokenizer(base)
    rows = to_trl_rows(cfg, pipeline.stage_data(cfg, pipeline.open_run(cfg, starting_training=True)).dataset.train)
    trainer = make_trainer(cfg, pipeline.RunPaths(cfg.output.dir), model, tokenizer, rows, [])
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)  # no second model in memory
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # move the policy away from the reference (the untouched base),
        if "lora_B.default" in name:  # else the step-0 loss is trivially ln 2
            p.data.normal_(0, 0.2)

    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch)).item()
        ids, completion = batch["input_ids"], batch["completion_mask"][:, 1:].float()
        inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}

        def sequence_logps() -> torch.Tensor:
            logits = model(**inputs).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            return (token_logps * completion).sum(-1)

        policy = sequence_logps()
        with model.disable_adapter():
            reference = sequence_logps()
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    by_hand = -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    assert abs(trl_loss - by_hand.item()) < 1e-5
    assert abs(by_hand.item() - 0.6931) > 1e-3  # a real check: not the trivial ln 2 of an untrained adapter
