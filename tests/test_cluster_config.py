"""The cluster section and the Ray runner's pure parts (no Ray cluster started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.cluster.ray_runner import portable_config, check_cluster, distributed_overrides, training_failure
from tunelab.config_file import validate_config
from tunelab.errors import ConfigError, DataError, TunelabError


def cfg(**sections):
    return validate_config({"data": {"train": "train.jsonl"}, "model": {"dtype": "float32"}, **sections})


def test_defaults_train_locally_and_workers_reserve_one_cpu_or_one_gpu():
    assert cfg().cluster.backend == "local"
    assert cfg(cluster={"backend": "ray"}).cluster.worker_resources() == {"CPU": 1.0}
    assert cfg(cluster={"use_gpu": True}).cluster.worker_resources() == {"CPU": 1.0, "GPU": 1.0}
    assert cfg(cluster={"use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 2}}).cluster.worker_resources() == {
        "CPU": 8, "GPU": 2}


def test_the_eval_after_training_goes_to_a_gpu_worker_unless_nodes_share_no_folder():
    def on_worker(**cluster):
        return cfg(cluster=cluster).cluster.evaluates_on_worker()

    assert not on_worker() and not on_worker(eval_on="worker")  # local training: eval here whatever eval_on says
    assert not on_worker(backend="ray")  # CPU workers: the driver has the same CPUs
    assert on_worker(backend="ray", use_gpu=True)  # the driver (a KubeRay head) may have no GPU
    assert not on_worker(backend="ray", use_gpu=True, storage_path="s3://bucket/runs")  # no shared run folder
    assert not on_worker(backend="ray", use_gpu=True, eval_on="driver")
    assert on_worker(backend="ray", eval_on="worker")


def test_the_eval_actor_holds_what_a_training_worker_holds():
    from tunelab.cluster.ray_eval import actor_options

    gpu = cfg(cluster={"backend": "ray", "use_gpu": True, "resources_per_worker": {"CPU": 8}}).cluster
    assert gpu.worker_resources() == {"CPU": 8, "GPU": 1.0}  # Ray Train adds the GPU use_gpu implies
    no_retry = {"max_restarts": 0, "max_task_retries": 0}
    assert actor_options(gpu.worker_resources()) == {"num_cpus": 8, "num_gpus": 1.0, **no_retry}
    # memory is an option of its own (as a custom resource Ray refuses it); other keys are custom resources
    custom = actor_options({"CPU": 2, "GPU": 0.5, "memory": 2**34, "accelerator_type:H100": 0.01})
    assert custom == {"num_cpus": 2, "num_gpus": 0.5, **no_retry, "memory": 2**34,
                      "resources": {"accelerator_type:H100": 0.01}}


def test_register_as_is_refused_for_a_full_fine_tune_before_training():
    with pytest.raises(ConfigError, match="track.register_as: the registry versions adapters, and method full"):
        cfg(method={"type": "full"}, track={"register_as": "orders"})


@pytest.mark.parametrize(("cluster", "message"), [
    ({"strategy": "fsdp"}, "cluster.strategy: fsdp shards the model across GPUs and needs cluster.use_gpu: true"),
    ({"use_gpu": True, "resources_per_worker": {"GPU": 0}}, "GPU must be above 0 with cluster.use_gpu: true"),
    ({"resources_per_worker": {"GPU": 1}}, "reserves GPUs but cluster.use_gpu is false"),
    ({"backend": "slurm"}, "cluster.backend"),
])
def test_impossible_cluster_settings_are_refused(cluster, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg(cluster=cluster)


def test_ray_backend_refuses_what_it_cannot_train():
    with pytest.raises(ConfigError, match="objective dpo runs with cluster.backend: local"):
        check_cluster(cfg(cluster={"backend": "ray"}, objective="dpo"))
    with pytest.raises(ConfigError, match="fsdp cannot shard method qlora"):
        check_cluster(cfg(cluster={"backend": "ray", "use_gpu": True, "strategy": "fsdp"}, method={"type": "qlora"}))
    check_cluster(cfg(cluster={"backend": "ray"}, objective="cpt"))


def test_workers_that_a_local_cluster_could_never_place_are_refused(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # the local cluster Ray starts has this machine's CPUs
    check_cluster(cfg(cluster={"backend": "ray", "num_workers": 2}))
    with pytest.raises(ConfigError, match=r"cluster\.num_workers: 3 workers x 1 CPU need 3 CPUs, and the local Ray "
                                          r"cluster this run starts has 2"):
        check_cluster(cfg(cluster={"backend": "ray", "num_workers": 3}))
    with pytest.raises(ConfigError, match=r"2 workers x 8 CPU need 16 CPUs"):
        check_cluster(cfg(cluster={"backend": "ray", "resources_per_worker": {"CPU": 8}}))
    # Joining a cluster: its own resources count, not this machine's.
    monkeypatch.setattr("tunelab.cluster.ray_runner._address_problems", lambda address: [])
    check_cluster(cfg(cluster={"backend": "ray", "num_workers": 3, "ray_address": "head:6379"}))


def test_a_cluster_address_nothing_answers_is_refused_in_seconds():
    import time

    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cluster\.ray_address: nothing answers at 127\.0\.0\.1:1 "):
        check_cluster(cfg(cluster={"backend": "ray", "ray_address": "127.0.0.1:1"}))
    assert time.monotonic() - started < 30  # Ray's own client retried for minutes
    with pytest.raises(ConfigError, match=r"expected auto, HOST:PORT or ray://HOST:PORT, got 'bogus'"):
        check_cluster(cfg(cluster={"backend": "ray", "ray_address": "bogus"}))


def test_ddp_skips_the_unused_parameter_search_and_fsdp_becomes_fsdp2_in_the_trainer():
    from transformers import TrainingArguments

    from tunelab.artifacts import RunPaths
    from tunelab.models import pick_precision
    from tunelab.train.args import training_kwargs
    from tunelab.train.policy import training_policy

    assert distributed_overrides(cfg(cluster={"backend": "ray"})) == {"ddp_find_unused_parameters": False}
    fsdp = cfg(cluster={"backend": "ray", "use_gpu": True, "strategy": "fsdp"}, train={"gradient_checkpointing": True})
    policy = training_policy(fsdp, pick_precision(fsdp.model), world_size=fsdp.cluster.num_workers)
    args = TrainingArguments(**{**training_kwargs(fsdp, RunPaths(Path("run")), policy, False),
                                **distributed_overrides(fsdp)})
    # What the Trainer hands accelerate's FSDP plugin (accelerate applies it on GPU process groups only, which
    # is why the config refuses fsdp without use_gpu).
    plugin = args._process_fsdp_args()
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["activation_checkpointing"] is True
    assert args.activation_checkpointing is False  # checkpointing inside FSDP, not a second time around it


def test_workers_get_absolute_paths_and_the_model_loss_under_ddp(tmp_path, monkeypatch):
    from tunelab.artifacts import RunPaths
    from tunelab.models import pick_precision
    from tunelab.train.policy import training_policy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    config = cfg(cluster={"backend": "ray", "num_workers": 2}, model={"name": "models/base"},
                 output={"dir": "runs/a"})
    shipped = portable_config(config, RunPaths(config.output.dir))
    assert shipped.output.dir == tmp_path / "runs" / "a" and shipped.model.name == str(tmp_path / "models" / "base")
    # Each worker trains in a process group of num_workers: the policy gives it the model's own loss.
    assert shipped.train.chunked_loss
    assert not training_policy(shipped, pick_precision(shipped.model), world_size=2).chunked_loss
    assert training_policy(shipped, pick_precision(shipped.model), world_size=1).chunked_loss


def test_a_worker_error_of_the_user_comes_back_as_itself_and_others_as_one_line_per_worker():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    bad_row = DataError("train.jsonl:3: field 'messages': missing")
    assert training_failure(WorkerGroupError("x", {1: bad_row, 0: RuntimeError("peer gone")})) is bad_row
    wrapped = RayTaskError("train_worker", "traceback...", bad_row).as_instanceof_cause()
    assert isinstance(wrapped, DataError) and training_failure(WorkerGroupError("x", {0: wrapped})) is bad_row

    failure = training_failure(WorkerGroupError("x", {0: MemoryError("6 worker(s) were killed\nmore"),
                                                      1: RuntimeError("")}))
    assert failure.problems == ["cluster: Ray worker 0 failed: MemoryError: 6 worker(s) were killed",
                                "cluster: Ray worker 1 failed: RuntimeError"]


def test_dry_run_checks_the_ray_backend_and_says_where_training_runs(tiny_config):
    from tunelab import pipeline

    tiny_config.cluster.backend = "ray"
    lines = pipeline.preflight(tiny_config)
    assert "training: 2 Ray CPU workers (ddp) on a local Ray cluster started for the run" in lines
    assert "eval after training (tunelab run): this process" in lines
    tiny_config.cluster.eval_on, tiny_config.track.register_as = "worker", "animals"
    lines = pipeline.preflight(tiny_config)
    assert ("eval after training (tunelab run): a Ray worker ({'CPU': 1.0}; cluster.eval_on: worker; waits up to 900 s "
            "for one to be free)") in lines
    assert "register (tunelab run): as animals, gate verdict included" in lines
    tiny_config.objective.type = "kto"
    with pytest.raises(ConfigError, match="objective kto runs with cluster.backend: local"):
        pipeline.preflight(tiny_config)


def test_the_adapter_and_curve_come_back_through_ray_storage_when_the_run_folder_is_not_shared(tmp_path):
    import json

    from ray.train import Checkpoint

    from tunelab.artifacts import RunPaths
    from tunelab.cluster.ray_runner import RESULT_FILE, _collect

    reported = tmp_path / "reported"  # what rank 0 reported from its own disk
    (reported / "adapter").mkdir(parents=True)
    (reported / "adapter" / "adapter_config.json").write_text("{}")
    (reported / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    result = {"steps": 1, "train_loss": 2.0, "first_loss": 2.0, "last_loss": 2.0, "val_loss": 1.5, "train_seconds": 1.0,
              "tokens_seen": 10, "tokens_per_second": 10.0, "peak_memory_mb": 1.0, "trainable_params": 1,
              "total_params": 2, "dropped_too_long": 0, "precision": "cpu", "stopped_early": False,
              "chat_template": "chatml (the model's own)"}
    (reported / RESULT_FILE).write_text(json.dumps(result))
    run = RunPaths(tmp_path / "run")
    run.root.mkdir()

    collected = _collect(Checkpoint.from_directory(str(reported)), run)
    assert collected.to_json() == result
    assert (run.adapter / "adapter_config.json").is_file() and run.metrics.read_text() == '{"step": 1, "loss": 2.0}\n'
    # Nothing to collect and nothing in the run folder: said plainly, not a missing-file traceback later.
    (reported / "adapter" / "adapter_config.json").unlink()
    (reported / "adapter").rmdir()
    with pytest.raises(TunelabError, match="holds no adapter; put the run folder on storage every node shares"):
        _collect(Checkpoint.from_directory(str(reported)), RunPaths(tmp_path / "elsewhere"))


def test_a_worker_running_out_of_gpu_memory_reaches_the_driver_as_the_runbooks_advice(tmp_path):
    import inspect

    import torch
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from tunelab.artifacts import RunPaths
    from tunelab.cluster import ray_runner
    from tunelab.errors import TrainingError
    from tunelab.train.oom import OOM_RUNBOOK, advice_on_out_of_memory

    config = cfg(cluster={"backend": "ray", "num_workers": 2, "use_gpu": True})
    config.train.batch_size = 8
    with pytest.raises(TrainingError) as caught:  # what train_worker does around training
        with advice_on_out_of_memory(config, RunPaths(tmp_path / "run")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    assert "with advice_on_out_of_memory(cfg, run):" in inspect.getsource(ray_runner.train_worker)
    wrapped = RayTaskError("train_worker", "traceback...", caught.value).as_instanceof_cause()
    shown = str(training_failure(WorkerGroupError("x", {1: wrapped, 0: RuntimeError("peer gone")})))
    assert "\n" not in shown and "it asked for 2.00 GiB more" in shown and "lower train.batch_size (now 8)" in shown
    assert "train.gradient_checkpointing=true" in shown and "method.type=qlora" in shown and OOM_RUNBOOK in shown
