"""output.overwrite keeps the trained run it replaces until the new one has trained: a new run that fails puts
it back; one stopped after a checkpoint keeps both, for --resume or a fresh start."""

from __future__ import annotations

import pytest

from tunelab import pipeline
from tunelab.artifacts import RunPaths, sha256_folder
from tunelab.errors import RunFolderError, TrainingError
from tunelab.run_replace import kept_aside


def trained(cfg) -> RunPaths:
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    return run


def test_a_replacement_that_fails_puts_the_trained_run_back(tiny_config):
    run = trained(tiny_config)
    before = sha256_folder(run.root)
    tiny_config.output.overwrite = True
    tiny_config.train.learning_rate = 1e30  # the loss turns NaN within a step or two: training stops with an error
    tiny_config.train.max_grad_norm = 1e30
    tiny_config.train.lr_scheduler = "constant"
    with pytest.raises(TrainingError, match="the loss is"):
        pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert sha256_folder(run.root) == before
    assert not kept_aside(run).exists()


def test_the_old_run_is_kept_aside_while_the_new_one_trains_and_goes_after(tiny_config):
    run = trained(tiny_config)
    old_adapter = (run.adapter / "adapter_model.safetensors").read_bytes()
    seen = []

    def look(row):  # called as each metrics row is written, mid-training
        aside = RunPaths(kept_aside(run))
        seen.append((aside.adapter / "adapter_model.safetensors").read_bytes() == old_adapter
                    and not run.adapter.exists())

    tiny_config.output.overwrite = True
    tiny_config.train.seed = 7
    pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True), on_metrics=look)
    assert seen and all(seen)
    assert not kept_aside(run).exists()
    assert (run.adapter / "adapter_model.safetensors").read_bytes() != old_adapter
    assert (run.data / "train.jsonl").is_file()  # the unchanged Dataset came along (linked back, then reused)


class Stop(KeyboardInterrupt):
    pass


def interrupted_replacement(cfg, stop_at: int = 6) -> tuple[RunPaths, str]:
    """A trained run, and a replacement of it stopped (Ctrl-C) at step `stop_at` (checkpoints every 4 steps)."""
    run = trained(cfg)
    before = sha256_folder(run.root)
    cfg.output.overwrite = True
    cfg.train.seed = 7
    cfg.train.max_steps = 12
    cfg.train.save_steps = 4

    def stop_after_a_checkpoint(row):
        if row.get("step", 0) >= stop_at and "loss" in row:
            raise Stop

    with pytest.raises(Stop):
        pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True), on_metrics=stop_after_a_checkpoint)
    assert sha256_folder(kept_aside(run)) == before  # the old run, whole, beside the stopped new one
    assert run.checkpoints.is_dir() and not run.is_trained
    return run, before


def test_a_stopped_replacement_resumes_and_then_the_old_run_goes(tiny_config):
    run, _ = interrupted_replacement(tiny_config)
    with pytest.raises(RunFolderError, match="stopped before it finished, and the run it replaces is kept at .*"
                                             "--resume` finishes it"):
        pipeline.stage_eval(tiny_config, run)  # evaluating the unfinished run says where the old one is
    tiny_config.output.overwrite = False
    result = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True, resume=True),
                                  resume=True)
    assert result.steps == 12 and run.is_trained
    assert not kept_aside(run).exists()


def test_a_stopped_replacement_started_over_puts_the_old_run_back_first(tiny_config):
    run, before = interrupted_replacement(tiny_config)
    tiny_config.output.overwrite = False
    with pytest.raises(RunFolderError, match="holds an unfinished run that replaces the run kept at"):
        pipeline.open_run(tiny_config, starting_training=True)
    assert sha256_folder(kept_aside(run)) == before  # refusing changed nothing

    tiny_config.output.overwrite = True
    tiny_config.train.learning_rate = 1e30  # and this start-over fails too: the old run is back, whole
    tiny_config.train.max_grad_norm = 1e30
    tiny_config.train.lr_scheduler = "constant"
    with pytest.raises(TrainingError):
        pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert sha256_folder(run.root) == before
    assert not kept_aside(run).exists()


def test_an_output_dir_that_is_a_link_keeps_its_link(tiny_config, tmp_path):
    real = tmp_path / "disk" / "run"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    tiny_config.output.dir = link
    trained(tiny_config)
    old_adapter = (real / "adapter" / "adapter_model.safetensors").read_bytes()
    tiny_config.output.overwrite, tiny_config.train.seed = True, 7
    pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert sorted(p.name for p in real.parent.iterdir()) == ["run"]  # nothing left aside


def killed_before_its_first_checkpoint(cfg) -> tuple[RunPaths, str]:
    """A trained run, and a replacement of it killed outright (SIGKILL) before its first checkpoint: the old run
    aside, the new folder with its config, its data and the empty checkpoints/ folder training makes at start."""
    import os
    import shutil

    run = trained(cfg)
    before = sha256_folder(run.root)
    aside = kept_aside(run)
    os.rename(run.root, aside)
    run.root.mkdir()
    shutil.copy2(aside / "config.yaml", run.config)
    shutil.copytree(aside / "data", run.data)
    run.checkpoints.mkdir()
    return run, before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_replacement_killed_before_its_first_checkpoint_trains_again(tiny_config, overwrite):
    # Both ways were refused before: "already holds a trained run" without overwrite, and with it the old run could
    # not be moved aside (one was there already), while --resume rightly found no checkpoint.
    run, before = killed_before_its_first_checkpoint(tiny_config)
    assert not run.holds_training
    tiny_config.output.overwrite = overwrite
    tiny_config.train.seed = 7
    result = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    assert result.steps == tiny_config.train.max_steps and run.is_trained
    assert not kept_aside(run).exists() and sha256_folder(run.root) != before


def test_an_unusable_newest_checkpoint_is_passed_over_for_an_older_one(tiny_config, capsys):
    run, _ = interrupted_replacement(tiny_config, stop_at=10)  # checkpoints after steps 4 and 8
    (run.checkpoints / "checkpoint-8" / "optimizer.pt").unlink()  # resuming without it: another training, silently
    tiny_config.output.overwrite = False
    result = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True, resume=True),
                                  resume=True)
    out = "".join(capsys.readouterr().err.split())  # rich wraps long lines, even inside a path
    assert result.steps == 12 and "checkpoint-8cannotberesumedfrom:optimizer.ptismissing;passedover" in out
    assert out.split("Resumingfrom")[1].split("train")[0].endswith("checkpoint-4")


def test_a_checkpoint_cut_short_is_named_not_a_traceback(tiny_config):
    run, _ = interrupted_replacement(tiny_config)
    for checkpoint in run.checkpoints.iterdir():
        weights = checkpoint / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    tiny_config.output.overwrite = False
    with pytest.raises(TrainingError, match=r"cannot be resumed from: adapter_model.safetensors: cut short, nor can "
                                            r"any older checkpoint"):
        pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True, resume=True),
                             resume=True)
