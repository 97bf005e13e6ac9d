"""Preference objectives on the tiny model, and TRL's DPO loss checked against the formula by hand."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import write_jsonl
from tunelab import pipeline
from tunelab.config_file import validate_config
from tunelab.errors import ConfigError


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
    # Progress and the loss curve show a throughput: the data's tokens times the epochs done, growing each row.
    seen = [row["tokens_seen"] for row in logged]
    assert all(row["tokens_per_second"] > 0 for row in logged) and seen == sorted(seen) and seen[0] > 0


def test_sft_rows_are_refused_for_dpo(tmp_path, tiny_model_dir, tiny_config):
    from tunelab.errors import DataError

    rows = [{"messages": [{"role": "user", "content": f"q{i} about things"}, {"role": "assistant", "content": "a"}]}
            for i in range(10)]
    cfg = make_config(tmp_path, tiny_model_dir, "dpo", rows)
    with pytest.raises(DataError, match=r"objective.type: dpo trains on preference rows, but \S+.jsonl holds chat rows"):
        pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True))


def test_dpo_loss_at_step_zero_matches_the_formula(tmp_path, tiny_model_dir):
    from peft import PeftModel

    from tunelab.models import Precision, load_tokenizer, resolve_model
    from tunelab.train.methods import build_trainable
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


def test_reward_model_trains_ranks_pairs_and_serves_as_a_grpo_reward(tmp_path, tiny_model_dir):
    from tunelab.train.grpo_rewards import resolve_rewards

    cfg = make_config(tmp_path, tiny_model_dir, "reward", preference_rows(30))
    cfg.data.test_fraction = 0.2
    cfg.train.max_steps = 12
    run = pipeline.open_run(cfg, starting_training=True)
    result = pipeline.stage_train(cfg, run)
    assert result.last_loss < result.first_loss
    accuracy = pipeline.stage_eval(cfg, run).metrics["suites"]["test"]["systems"]["tuned"]["pairwise_accuracy"]
    assert accuracy == 1.0  # chosen ("cat") vs rejected ("dog dog dog") is an easy, learnable contrast

    # A gate rule on a number a reward model does not measure: the measured accuracy is written, then it fails.
    shutil.rmtree(run.eval)
    cfg.eval.gate = ["tuned.exact_match >= 0.5"]
    with pytest.raises(ConfigError, match="'tuned.exact_match' was not measured"):
        pipeline.stage_eval(cfg, run)
    kept = json.loads((run.eval / "metrics.json").read_text())
    assert kept["suites"]["test"]["systems"]["tuned"]["pairwise_accuracy"] == 1.0
    (unread,) = kept["gate"]  # the rule is kept as failed: a gate that cannot be read is no evidence
    assert unread["passed"] is False and "was not measured" in unread["error"] and unread["left"] is None

    cfg.objective.rewards = [f"reward_model:{run.root}"]
    (reward_model,) = resolve_rewards(cfg.objective)
    assert reward_model.config.num_labels == 1 and not hasattr(reward_model, "peft_config")


def test_grpo_trains_with_builtin_and_imported_rewards(tmp_path, tiny_model_dir):
    from tests.conftest import animal_rows

    cfg = make_config(tmp_path, tiny_model_dir, "grpo", animal_rows(24),
                      rewards=["exact_match", "length_penalty", "tunelab.train.grpo_rewards:json_valid"],
                      target_words=3, num_generations=4, max_completion_tokens=6)
    cfg.train.max_steps = 3
    run = pipeline.open_run(cfg, starting_training=True)
    result = pipeline.stage_train(cfg, run)
    assert result.steps == 3 and (run.adapter / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in run.metrics.read_text().splitlines() if '"loss"' in line]
    assert {"rewards/exact_match/mean", "rewards/length_penalty/mean", "rewards/json_valid/mean"} <= set(logged[0])


def test_grpo_says_when_no_group_of_answers_ever_differed_in_reward(tmp_path, tiny_model_dir, capsys):
    from tests.conftest import animal_rows

    # A random tiny model never names the animal: exact_match is 0 for every answer, every advantage is 0.
    cfg = make_config(tmp_path, tiny_model_dir, "grpo", animal_rows(24), rewards=["exact_match"], num_generations=4,
                      max_completion_tokens=4)
    cfg.train.max_steps = 2
    pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True))
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {row["frac_reward_zero_std"] for row in logged if "loss" in row} == {1.0}
    assert "every group of answers to a prompt got equal rewards" in " ".join(capsys.readouterr().err.split())
    # A reward that tells answers apart (length) gives a signal, and no warning.
    cfg.objective.rewards, cfg.output.overwrite = ["length_penalty"], True
    pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True))
    assert "got equal rewards" not in capsys.readouterr().err


def test_builtin_rewards_score_what_they_say():
    from tunelab.config import ObjectiveConfig
    from tunelab.train.grpo_rewards import (
        exact_match,
        json_valid,
        length_penalty_reward,
        resolve_rewards,
    )

    completions = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "{\"a\": 1}"}]]
    assert exact_match(completions, answer=["paris", "x"]) == [1.0, 0.0]
    assert json_valid(completions) == [0.0, 1.0]
    assert length_penalty_reward(2)(["one two three four"]) == [-1.0]
    regex = resolve_rewards(ObjectiveConfig(type="grpo", rewards=["regex"], reward_regex=r"^\{"))[0]
    assert regex(completions) == [0.0, 1.0]
    with pytest.raises(ConfigError, match="needs objective.reward_regex"):
        resolve_rewards(ObjectiveConfig(type="grpo", rewards=["regex"]))
    with pytest.raises(ConfigError, match="cannot import 'no.such:thing'"):
        resolve_rewards(ObjectiveConfig(type="grpo", rewards=["no.such:thing"]))


def test_trl_trainers_checkpoint_atomically_too(tmp_path, tiny_model_dir):
    from tunelab.train.trainer import complete_checkpoints

    cfg = make_config(tmp_path, tiny_model_dir, "dpo", preference_rows(24))
    cfg.train.save_steps, cfg.train.max_steps, cfg.train.keep_checkpoints = 2, 6, 2
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    assert [p.name for p in complete_checkpoints(run.checkpoints)] == ["checkpoint-4", "checkpoint-6"]
    assert not (run.checkpoints / ".staging").exists()


@pytest.mark.parametrize("precompute", [True, False])
def test_kto_reference_log_probs_are_computed_once_before_training(tmp_path, tiny_model_dir, precompute):
    from tunelab.models import Precision, load_tokenizer, resolve_model
    from tunelab.train.methods import build_trainable
    from tunelab.train.preference import make_trainer, to_trl_rows

    cfg = make_config(tmp_path, tiny_model_dir, "kto", kto_rows(8), precompute_ref=precompute)
    base = resolve_model(cfg.model)
    model = build_trainable(cfg, base, Precision("cpu", None, torch.float32))
    rows = to_trl_rows(cfg, pipeline.stage_data(cfg, pipeline.open_run(cfg, starting_training=True)).dataset.train)
    trainer = make_trainer(cfg, pipeline.RunPaths(cfg.output.dir), model, load_tokenizer(base), rows, [])
    # precomputed: each row carries its reference log-prob (and the KL pair's) into the training batches
    assert ("ref_logps" in trainer.train_dataset.column_names) == precompute


def test_dpo_from_an_sft_adapter_is_measured_against_that_sft_model(tmp_path, tiny_model_dir, tiny_config):
    """SFT -> DPO: at the first step the policy is the SFT model and so is the reference, so the loss is ln 2 and
    every reward is 0. Measured against the base instead, the SFT's own shift would show as a reward margin."""
    import json
    import math

    tiny_config.method.dropout, tiny_config.train.max_steps = 0.0, 6
    tiny_config.train.save_steps = None
    pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    cfg = make_config(tmp_path, tiny_model_dir, "dpo", preference_rows(24))
    cfg.model.adapter_from, cfg.train.max_steps = tiny_config.output.dir, 1
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    (first,) = [json.loads(line) for line in run.metrics.read_text().splitlines() if '"loss"' in line]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/margins"]) < 1e-5


def test_grpo_completions_end_at_the_templates_end_of_turn_on_a_base_model(tmp_path):
    """A base model given ChatML: <|im_end|> is a new token, neither the tokenizer's eos nor in the model's
    generation config, where TRL looks for the ids that end a completion."""
    from tests import model_zoo as zoo
    from tests.conftest import animal_rows
    from tunelab.train.methods import build_trainable
    from tunelab.train.preference import make_trainer
    from tunelab.train.sft import training_inputs

    base = zoo.build_base_model(tmp_path / "base", arch="llama")
    cfg = make_config(tmp_path, base, "grpo", animal_rows(8), rewards=["exact_match"], num_generations=4)
    cfg.data.chat_template = "chatml"
    run = pipeline.open_run(cfg, starting_training=True)
    precision, base_path, tokenizer, template = training_inputs(cfg)
    model = build_trainable(cfg, base_path, precision, tokenizer, template)
    rows = [{"prompt": [{"role": "user", "content": "Name an animal."}], "reference": "cat"}] * 8
    trainer = make_trainer(cfg, run, model, tokenizer, rows, [])
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in trainer.eos_token_ids
    assert tokenizer.eos_token_id in trainer.eos_token_ids


def test_a_reward_model_on_a_base_model_trains_the_tokens_its_template_adds(tmp_path):
    """A base model given ChatML: the run's tokenizer holds <|im_start|>/<|im_end|> past the base's vocabulary
    (TRL's reward trainer raised IndexError on them); their rows now train and reload with the score head."""
    from tests import model_zoo as zoo
    from tunelab.train.grpo_rewards import resolve_rewards

    base = zoo.build_base_model(tmp_path / "base", arch="llama")
    cfg = make_config(tmp_path, base, "reward", preference_rows(30))
    cfg.data.chat_template, cfg.data.test_fraction, cfg.train.max_steps = "chatml", 0.2, 4
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    trained = json.loads(run.adapter_config.read_text())
    assert trained["task_type"] == "SEQ_CLS" and trained["trainable_token_indices"]
    suite = pipeline.stage_eval(cfg, run).metrics["suites"]["test"]["systems"]["tuned"]
    assert 0.0 <= suite["pairwise_accuracy"] <= 1.0
    cfg.objective.rewards = [f"reward_model:{run.root}"]
    (reward_model,) = resolve_rewards(cfg.objective)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    assert reward_model.get_input_embeddings().weight.shape[0] > vocab
