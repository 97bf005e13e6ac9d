"""Robust training: kill-and-resume equals an uninterrupted run; accumulation equals a large batch;
NaN stops loudly; early stopping, wall-time budget and NEFTune do what they say."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tunelab import pipeline
from tunelab.config_file import dump_config
from tunelab.errors import TrainingError
from tunelab.train.trainer import complete_checkpoints


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_resume_reaches_the_uninterrupted_result(tiny_config, tmp_path):
    tiny_config.train.max_steps = 80
    tiny_config.train.save_steps = 10
    tiny_config.train.batch_size = 4
    tiny_config.train.learning_rate = 1e-3
    tiny_config.train.keep_checkpoints = 2
    tiny_config.output.dir = tmp_path / "uninterrupted"
    reference = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert reference.steps == 80

    tiny_config.output.dir = tmp_path / "killed"
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(dump_config(tiny_config))
    command = [sys.executable, "-m", "tunelab", "train", str(config_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300  # generous: a busy machine slows start-up, not the check
    while not _logged_past_a_checkpoint(tmp_path / "killed", at_least=30):
        assert process.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()
    # The newest two are kept; old ones are pruned only after the new one is complete, so a kill between the two
    # (seen under load) leaves one more: never fewer than the newest complete checkpoint.
    assert len(complete_checkpoints(checkpoints)) <= 3

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stderr
    assert len(complete_checkpoints(checkpoints)) <= 2  # the resumed run pruned down to the newest two
    a, b = adapter_tensors(tmp_path / "uninterrupted"), adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # One loss curve: the rows the killed run logged past its checkpoint were redone, not doubled.
    curves = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("uninterrupted", "killed")]
    steps = [[row["step"] for row in curve if "loss" in row] for curve in curves]
    assert steps[1] == steps[0] == sorted(set(steps[0]))
    losses = [[row["loss"] for row in curve if "loss" in row] for curve in curves]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    # The run's recorded results cover the whole run, not only the part after the resume (its mean loss was the
    # resumed part's loss over every step; first loss, tokens seen and the tokens column restarted).
    trained = json.loads((tmp_path / "killed" / "manifest.json").read_text())["train"]
    assert trained["first_loss"] == pytest.approx(reference.first_loss, abs=1e-4)
    assert trained["train_loss"] == pytest.approx(reference.train_loss, rel=1e-3)
    # Tokens are counted as batches are collated, and the data loader reads one batch ahead: the part before the
    # checkpoint is taken from its last logged row, which already counted the batch the resumed run starts with.
    assert trained["tokens_seen"] == pytest.approx(reference.tokens_seen, rel=0.02)  # it restarted at 0 (-60%)
    tokens = [[row["tokens_seen"] for row in curve if "loss" in row] for curve in curves]
    assert tokens[1] == pytest.approx(tokens[0], rel=0.05)


def _logged_past_a_checkpoint(run_dir, at_least: int) -> bool:
    """The newest complete checkpoint is at step >= `at_least` and the loss curve already holds a later step
    (which the resumed run redoes)."""
    found = complete_checkpoints(run_dir / "checkpoints")
    newest = int(found[-1].name.split("-")[1]) if found else 0
    if newest < at_least or not (run_dir / "metrics.jsonl").exists():
        return False
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return any(line.startswith('{"step": ') and int(line.split(",")[0].split()[-1]) > newest for line in lines)


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_config):
    """Refused when the run folder opens, before data or weights load; and by training itself (a cluster worker
    calls it directly)."""
    with pytest.raises(TrainingError, match=r"^--resume: no complete checkpoint in .* \(one is saved every "
                                            r"train.save_steps=\d+ steps\); train without --resume$"):
        pipeline.open_run(tiny_config, starting_training=True, resume=True)
    run = pipeline.open_run(tiny_config, starting_training=True)
    with pytest.raises(TrainingError, match="--resume: no complete checkpoint in"):
        pipeline.stage_train(tiny_config, run, resume=True)
    tiny_config.train.save_steps = None
    with pytest.raises(TrainingError, match=r"\(train.save_steps is null: none are saved\); train without --resume$"):
        pipeline.open_run(tiny_config, starting_training=True, resume=True)


def test_accumulated_small_batches_equal_one_large_batch(tiny_config, tmp_path):
    """The loss is normalized by all target tokens of the accumulated step, not averaged per micro-batch
    (which weights short examples more: the bug peers shipped for years)."""
    tiny_config.method.dropout = 0.0
    tiny_config.train.max_steps = 1
    tiny_config.train.warmup_ratio = 0.0
    tiny_config.train.save_steps = None
    results = {}
    for batch, accumulate in ((8, 1), (2, 4)):
        tiny_config.train.batch_size, tiny_config.train.gradient_accumulation_steps = batch, accumulate
        tiny_config.output.dir = tmp_path / f"bs{batch}"
        results[batch] = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert results[8].first_loss == pytest.approx(results[2].first_loss, rel=1e-5)
    # The accumulated gradient itself (a per-micro-batch mean would change its norm)...
    norms = {b: json.loads((tmp_path / f"bs{b}" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
             for b in (8, 2)}
    assert norms[8] == pytest.approx(norms[2], rel=1e-4)
    # ...and the adapter after the step. Adam's first step is ~lr * sign(gradient), so float noise on a
    # near-zero gradient element (summation order differs between one padding-free row of 8 and four of
    # 2) can move that element by a fraction of lr; a wrong normalization flips the sign of the update of
    # every element where micro-batches disagree (a change of 2 x lr).
    a, b = adapter_tensors(tmp_path / "bs8"), adapter_tensors(tmp_path / "bs2")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-4)


def test_nan_loss_stops_naming_step_and_examples(tiny_config):
    tiny_config.train.learning_rate = 1e30  # weights overflow float32 within a step or two
    tiny_config.train.max_grad_norm = 1e30
    tiny_config.train.warmup_ratio = 0.0
    tiny_config.train.lr_scheduler = "constant"
    run = pipeline.open_run(tiny_config, starting_training=True)
    with pytest.raises(TrainingError) as info:
        pipeline.stage_train(tiny_config, run)
    (message,) = info.value.problems
    assert message.startswith("training stopped: the loss is ")
    assert " at step " in message and "(examples: ex-" in message
    assert not run.adapter.exists()


def test_early_stopping_stops_when_val_loss_stalls(tiny_config):
    tiny_config.train.learning_rate = 1e-12  # nothing moves: val loss never improves after the first eval
    tiny_config.train.lr_scheduler = "constant"
    tiny_config.train.max_steps = 40
    tiny_config.train.eval_steps = 2
    tiny_config.train.early_stopping_patience = 2
    result = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert result.steps == 6


def test_wall_time_budget_stops_with_a_checkpoint_that_resumes(tiny_config):
    tiny_config.train.max_steps = 100  # well over 0.6 s of training even on a fast machine
    tiny_config.train.max_time_minutes = 0.01  # 0.6 s
    run = pipeline.open_run(tiny_config, starting_training=True)
    first = pipeline.stage_train(tiny_config, run)
    assert first.stopped_early and first.steps < 100
    assert complete_checkpoints(run.checkpoints)[-1].name == f"checkpoint-{first.steps}"
    tiny_config.train.max_time_minutes = None
    second = pipeline.stage_train(tiny_config, run, resume=True)
    assert second.steps == 100


def test_resume_refuses_a_changed_config_or_data(tiny_config, tmp_path):
    """A checkpoint's optimizer state and data order belong to the run that wrote it: resuming it under another
    learning rate, seed or data would continue some other training. Budgets may change."""
    tiny_config.train.max_steps, tiny_config.train.save_steps = 4, 2
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    shutil.rmtree(run.adapter)  # cut short after its last checkpoint
    changed = tiny_config.model_copy(deep=True)
    changed.train.learning_rate, changed.train.seed = 0.5, 7
    with pytest.raises(TrainingError, match=r"--resume: .* started training with another config or data "
                                            r"\(train.learning_rate: 0.01 -> 0.5; train.seed: 42 -> 7\)"):
        pipeline.open_run(changed, starting_training=True, resume=True)
    wider = tiny_config.model_copy(deep=True)
    wider.cluster.backend, wider.cluster.num_workers = "ray", 4  # a global batch 4x as large
    with pytest.raises(TrainingError, match=r"training processes \(cluster.backend/num_workers\): 1 -> 4"):
        pipeline.open_run(wider, starting_training=True, resume=True)
    other_data = tiny_config.model_copy(deep=True)
    other_data.data.seed = 99  # another split: rows trained on could land in the test split
    with pytest.raises(TrainingError, match=r"the data \(its sources or the data section\)"):
        pipeline.open_run(other_data, starting_training=True, resume=True)
    longer = tiny_config.model_copy(deep=True)
    longer.train.max_steps = 6
    pipeline.stage_train(longer, pipeline.open_run(longer, starting_training=True, resume=True), resume=True)
    assert (run.adapter / "adapter_config.json").is_file()


def test_neftune_adds_noise_only_while_training(tiny_config, tmp_path):
    losses = {}
    for alpha in (None, 5.0):
        tiny_config.train.neftune_noise_alpha = alpha
        tiny_config.train.padding_free = False  # NEFTune turns padding-free off: the same batches both times
        tiny_config.train.max_steps = 1
        tiny_config.output.dir = tmp_path / f"neft{alpha}"
        result = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
        losses[alpha] = (result.first_loss, result.model)
    assert losses[None][0] != losses[5.0][0]  # same seed, same batches: only the embedding noise differs
    # No hook is left behind: even in training mode the embeddings are the table's rows, noise-free.
    ids = torch.tensor([[5, 6, 7]])
    emb = losses[5.0][1].get_input_embeddings()
    emb.train()
    with torch.no_grad():
        assert torch.equal(emb(ids), emb.weight[ids])
