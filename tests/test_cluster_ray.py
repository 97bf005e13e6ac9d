"""cluster.backend: ray on a real local Ray cluster: 2 CPU workers (gloo DDP) train like one process.

Fairness of the comparison: the Trainer shards *batches*, not examples. Both runs draw one shuffled order
from the same seed; with 2 workers x batch 2, step k gives worker 0 batch 2k and worker 1 batch 2k+1 of
size 2, i.e. the same 4 examples the single process takes as its batch k of size 4. The loss is normalized
by the target tokens of the whole global batch (counted across workers), and DDP averages gradients, so
each optimizer step sees the same gradient. Dropout is 0 and the adapter is initialized from the same seed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

# Measured (2 CPU workers vs 1 process, 6 steps of lr 1e-2): per-step losses within 1.4e-6, adapter weights
# within 8.1e-5 (2.2e-4 with the DDP process group started by hand; weights up to 0.15). The two runs sum the
# same gradients in a different order (an all-reduce of two half-batch gradients vs one batch), and Adam
# divides each step by sqrt(v): rounding in coordinates whose gradient is near zero becomes a visible weight
# difference. A run whose gradients are not synchronized misses by 0.065 (measured), far outside these bounds.
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-3


def _config(tiny_config, folder: Path, batch_size: int, cluster: dict, track: bool):
    from tunelab.config_file import validate_config

    data = tiny_config.model_dump(mode="json")
    data["method"]["dropout"] = 0.0
    data["train"].update(batch_size=batch_size, max_steps=6, save_steps=3)
    data["track"]["enabled"] = track
    data["cluster"] = cluster
    data["output"]["dir"] = str(folder)
    return validate_config(data)


def _curve(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ray_workers_train_like_one_process_and_resume_to_the_same_adapter(tiny_config, tmp_path, ray_session):
    import torch
    from safetensors.torch import load_file

    from tunelab import pipeline

    single = _config(tiny_config, tmp_path / "single", 4, {}, track=False)
    reference = pipeline.stage_train(single, pipeline.open_run(single, starting_training=True))

    ddp = _config(tiny_config, tmp_path / "ddp", 2, {"backend": "ray", "num_workers": 2}, track=True)
    started = time.perf_counter()
    result = pipeline.stage_train(ddp, pipeline.open_run(ddp, starting_training=True))
    print(f"ray DDP stage_train: {time.perf_counter() - started:.1f} s")
    run = tmp_path / "ddp"

    # The same loss at every step, written once per step (rank 0 alone writes the curve).
    one, two = _curve(tmp_path / "single"), _curve(run)
    train_rows = [r for r in two if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip([r for r in one if "loss" in r], train_rows, strict=True))
    assert loss_diff < LOSS_TOLERANCE
    assert result.steps == 6 and abs(result.last_loss - train_rows[-1]["loss"]) < 1e-9
    assert result.tokens_seen == reference.tokens_seen  # summed over both workers: the same examples were seen

    # The same adapter, and it moved far more than the tolerance (so this comparison can fail).
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"single vs 2-worker DDP: loss max diff {loss_diff:.2e}, adapter max diff {weight_diff:.2e}")
    assert weight_diff < WEIGHT_TOLERANCE
    lora_b = [k for k in a if "lora_B" in k]  # zero at initialization
    assert max(a[k].abs().max().item() for k in lora_b) > 20 * WEIGHT_TOLERANCE
    assert torch.isfinite(torch.cat([t.flatten() for t in b.values()])).all()

    # Complete checkpoints in the run folder, with both workers' RNG states, nothing half-written.
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    files = {p.name for p in (checkpoints / "checkpoint-6").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= files
    assert not (run / "ray").exists()  # Ray's own bookkeeping is cleared once the result is collected
    assert json.loads((run / "manifest.json").read_text())["train"]["steps"] == 6

    # One MLflow run: rank 0's per-step losses and the driver's summary land in the run the driver opened.
    from mlflow import MlflowClient

    stamp = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=stamp["tracking_uri"])
    losses = client.get_metric_history(stamp["run_id"], "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    assert "train_seconds" in client.get_run(stamp["run_id"]).data.metrics
    assert len(client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])) == 1

    # Cut short after the first checkpoint (adapter and later checkpoint gone, as after a kill), then --resume:
    # both workers restore their own RNG state and the run ends with the same adapter (measured: identical).
    shutil.rmtree(run / "adapter")
    shutil.rmtree(checkpoints / "checkpoint-6")
    pipeline.stage_train(ddp, pipeline.open_run(ddp, starting_training=True, resume=True), resume=True)
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert max((resumed[k] - b[k]).abs().max().item() for k in b) < 1e-6


def test_run_evaluates_on_a_ray_worker_and_registers_what_it_measured(tiny_config, tmp_path, ray_session,
                                                                       monkeypatch):
    """cluster.eval_on: worker (what a GPU job gets by default): the eval of `tunelab run` is a Ray task that reads
    the run folder and writes eval/ into it; the driver records it and registers the version (track.register_as)."""
    import os

    from mlflow import MlflowClient

    from tunelab import pipeline
    from tunelab.artifacts import RunPaths
    from tunelab.errors import DataError
    from tunelab.track import GATE_PASSED_TAG

    cfg = _config(tiny_config, tmp_path / "run", 8, {"backend": "ray", "num_workers": 1, "eval_on": "worker"},
                  track=True)
    cfg.track.register_as = "tiny-animals"
    cfg.eval.gate = ["tuned.exact_match >= 0"]  # passes: the version carries a passed gate
    summary = pipeline.run_all(cfg)
    run = tmp_path / "run"

    timing = json.loads((run / "eval" / "metrics.json").read_text())["timing"]
    assert timing["placement"].startswith("Ray worker (pid ") and timing["device"] == "cpu"
    assert int(timing["placement"].split("pid ")[1].rstrip(")")) != os.getpid()  # not evaluated in this process
    assert summary.eval.metrics["timing"] == timing
    report = (run / "eval" / "report.md").read_text()
    assert f"on cpu ({timing['host']}, Ray worker (pid " in report
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["eval"] and manifest["gate_passed"] is True  # the driver recorded the worker's result

    # Registered with the evidence the worker measured.
    stamp = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=stamp["tracking_uri"])
    [version] = client.search_model_versions("name='tiny-animals'")
    assert str(version.version) == str(summary.registered.version) == "1" and summary.new_version
    assert version.tags[GATE_PASSED_TAG] == "true" and version.run_id == stamp["run_id"]

    # A user mistake met on the worker (a broken row in an eval suite file) is one line naming file and line, and
    # the run's eval is left as it was. The path is relative to the driver's folder, as written in a config.
    monkeypatch.chdir(tmp_path)
    Path("suite.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                   '"content": "ok"}]}\n{oops\n')
    broken = cfg.model_copy(deep=True)
    broken.eval.suites[0].files = [Path("suite.jsonl")]
    before = (run / "eval" / "metrics.json").read_bytes()
    with pytest.raises(DataError, match=r"suite\.jsonl:2"):
        pipeline.stage_eval(broken, RunPaths(run), after_training=True)
    assert (run / "eval" / "metrics.json").read_bytes() == before


def test_no_free_worker_for_the_eval_stops_after_eval_wait_s_and_harms_nothing(tiny_config, tmp_path, ray_session,
                                                                               capsys):
    """A busy cluster: the eval's actor cannot be placed (it asks for more CPUs than the cluster has free). The run
    waits cluster.eval_wait_s, saying what is free, then stops with one error; its actor is gone (the cluster's
    CPUs are free again for other work) and nothing was written into the run folder."""
    import ray

    from tunelab.artifacts import RunPaths
    from tunelab.cluster.ray_eval import EvalWorker, evaluate_on_worker, wait_until_placed
    from tunelab.errors import TunelabError

    cfg = _config(tiny_config, tmp_path / "run", 8, {"backend": "ray", "eval_on": "worker", "eval_wait_s": 1.5,
                                                     "resources_per_worker": {"CPU": 64}}, track=False)
    run = RunPaths(tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(TunelabError, match=r"cluster\.eval_wait_s: no Ray worker with \{'CPU': 64\.0\} came free "
                                           r"within 1\.5 s \(free now: \{'CPU': 2\.0.*\); the trained run is kept"):
        evaluate_on_worker(cfg, run)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run").exists()
    assert ray.is_initialized()  # the test's session, not one started by the eval, stays up

    # The actor gave back what it held: one that needs both CPUs is placed at once.
    both = ray.remote(EvalWorker).options(num_cpus=2).remote()
    assert wait_until_placed(both, {"CPU": 2.0}, wait_s=60)
    ray.kill(both)

    # While it waits it says so, with what is free.
    capsys.readouterr()
    stuck = ray.remote(EvalWorker).options(num_cpus=64).remote()
    with pytest.raises(TunelabError):
        wait_until_placed(stuck, {"CPU": 64.0}, wait_s=1.0, every_s=0.3)
    ray.kill(stuck)
    said = " ".join(capsys.readouterr().err.split())
    assert said.count("eval: still waiting for a Ray worker with {'CPU': 64.0}; free now: {'CPU': 2.0, 'memory': '") >= 2


def test_a_worker_that_does_not_see_the_run_folder_says_so(tiny_config, tmp_path):
    from tunelab.cluster.ray_eval import _measure_task
    from tunelab.errors import RunFolderError

    with pytest.raises(RunFolderError, match="does not see the trained run in .*: a worker evaluates from the run "
                                             "folder, so it must be on storage every node shares"):
        _measure_task(tiny_config.model_dump(mode="json"), str(tmp_path / "elsewhere"), str(tmp_path))
