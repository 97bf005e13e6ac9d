"""The train stage on a Ray cluster: Ray Train's TorchTrainer runs the same Trainer-based SFT path in every worker.

Ray starts `cluster.num_workers` processes and sets up the torch.distributed process group (gloo on CPU,
NCCL on GPU) plus the RANK / WORLD_SIZE / LOCAL_RANK variables; transformers' Trainer (through accelerate)
sees an initialized group and trains data parallel: each optimizer step takes `train.batch_size` rows per
worker from one shared shuffled order, gradients are averaged, and the loss is normalized by the target
tokens of the whole global batch. FSDP is the same Trainer with its FSDP2 arguments. Each worker's training
path comes from tunelab.train.policy for the group's size: with several workers, the model's own loss.

Only the world's rank 0 writes: metrics.jsonl, checkpoints/ and adapter/ in the run folder, and metrics to
the run's MLflow run. At the end rank 0 reports its TrainResult (and, when Ray's storage is an object store
rather than a shared folder, the trained adapter and loss curve) through a Ray Train checkpoint; the driver
puts them into the run folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir
from tunelab.config import VIRTUAL_TOKEN_METHODS, RunConfig
from tunelab.data.prepare import Dataset
from tunelab.errors import ConfigError, TunelabError
from tunelab.progress import console
from tunelab.train.sft import TrainResult

RESULT_FILE = "train_result.json"
RAY_OBJECTIVES = ("sft", "cpt")


def check_cluster(cfg: RunConfig) -> None:
    """Refuse, before Ray starts, what the Ray backend cannot run."""
    problems = []
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.train") is None:
        problems.append("cluster.backend: ray needs Ray Train; install it with pip install 'ray[train]==2.60.0'")
    if cfg.objective.type not in RAY_OBJECTIVES:
        problems.append(f"cluster.backend: ray trains objectives {', '.join(RAY_OBJECTIVES)}; "
                        f"objective {cfg.objective.type} runs with cluster.backend: local")
    if cfg.cluster.strategy == "fsdp" and cfg.method.type in ("qlora", *VIRTUAL_TOKEN_METHODS):
        problems.append(f"cluster.strategy: fsdp cannot shard method {cfg.method.type}; use strategy: ddp")
    if cfg.cluster.use_gpu and cfg.model.device not in ("auto", "cuda"):
        problems.append(f"model.device: {cfg.model.device} conflicts with cluster.use_gpu: true; use auto or cuda")
    problems += _workers_fit_this_machine(cfg) + _address_problems(cfg.cluster.ray_address)
    if problems:
        raise ConfigError(*problems)


def _workers_fit_this_machine(cfg: RunConfig) -> list[str]:
    """A local cluster (no ray_address) has this machine's CPUs and GPUs: workers asking more than that would
    never be placed, and Ray Train would wait for them forever."""
    c = cfg.cluster
    if c.ray_address is not None:
        return []
    wants = c.worker_resources()
    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(_local_gpus()) if c.use_gpu else 0.0}
    problems = []
    for name in ("CPU", "GPU"):
        need = wants.get(name, 0.0) * c.num_workers
        if need > have[name]:
            problems.append(f"cluster.num_workers: {c.num_workers} workers x {wants[name]:g} {name} need {need:g} "
                            f"{name}s, and the local Ray cluster this run starts has {have[name]:g}; lower "
                            "num_workers or resources_per_worker, or join a larger cluster (cluster.ray_address)")
    return problems


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _address_problems(address: str | None) -> list[str]:
    """A cluster address that cannot work, found in seconds: Ray's own client waits minutes on a dead GCS."""
    if address is None or address == "auto":
        return []
    if address.startswith("ray://"):
        if importlib.util.find_spec("grpc") is None:
            return [f"cluster.ray_address: {address} is a Ray Client address, which needs "
                    "pip install 'ray[client]==2.60.0' (or join with host:6379 from a node of the cluster)"]
        target = address.removeprefix("ray://")
    else:
        target = address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return [f"cluster.ray_address: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}"]
    import socket

    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            return []
    except OSError as err:
        return [f"cluster.ray_address: nothing answers at {target} ({err.strerror or type(err).__name__}); "
                "start the cluster, or check the address"]


def distributed_overrides(cfg: RunConfig) -> dict[str, Any]:
    """TrainingArguments that differ from a single-process run: FSDP2 for strategy fsdp, nothing for ddp
    (the Trainer wraps the model in DistributedDataParallel by itself once a process group exists)."""
    if cfg.cluster.strategy != "fsdp":
        # Every trainable parameter gets a gradient each step; the Trainer's default (search for unused ones)
        # costs an extra pass over the autograd graph per step.
        return {"ddp_find_unused_parameters": False}
    return {
        "fsdp": True,
        # FULL_STATE_DICT: checkpoints and the adapter are ordinary single files, gathered on rank 0.
        # Activation checkpointing inside FSDP avoids the extra all-gather the Trainer's own flag costs.
        "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                        "activation_checkpointing": cfg.train.gradient_checkpointing},
        "activation_checkpointing": False,
        "activation_checkpointing_kwargs": None,
    }


def train_on_ray(cfg: RunConfig, run: RunPaths, dataset: Dataset, resume: bool = False,
                 on_metrics: Any = None) -> TrainResult:
    """Train on `cfg.cluster.num_workers` Ray workers; same outputs in `run` as a local run.

    `on_metrics` is not called: rank 0 logs each row to the run's MLflow run itself, as it trains."""
    check_cluster(cfg)
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tunelab.models import resolve_model

    resolve_model(cfg.model)  # convert a GGUF into the cache once, before the workers would race for it
    storage = _storage_path(cfg, run)
    worker_config = {
        "cfg": portable_config(cfg, run).model_dump(mode="json"),
        "run_root": str(run.root.resolve()),
        "dataset": dataset,  # shipped through Ray's object store: workers need no copy of the data folder
        "resume": resume,
        "overrides": distributed_overrides(cfg),
        "tracking_stamp": _tracking_stamp(run),
        "deliver_trained": "://" in storage,
    }
    c = cfg.cluster
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config,
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker=c.worker_resources()),
        run_config=RayRunConfig(name=f"{run.root.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage),
    )
    started_here = connect_ray(cfg)
    console.print(f"Ray: {c.num_workers} {'GPU' if c.use_gpu else 'CPU'} workers, {c.strategy}, "
                  f"{c.worker_resources()} each")
    try:
        result = _fit(trainer)
    finally:
        if started_here:
            import ray

            ray.shutdown()
    train_result = _collect(result.checkpoint, run)
    if cfg.cluster.storage_path is None:
        shutil.rmtree(storage, ignore_errors=True)  # Ray's own bookkeeping; everything that matters is in `run`
    return train_result


def train_worker(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker (a package-level function, so workers can import it)."""
    import ray.train
    import torch

    from tunelab.train.oom import advice_on_out_of_memory
    from tunelab.train.sft import train_sft

    rank = ray.train.get_context().get_world_rank()
    if torch.cuda.is_available():
        # Ray shows every worker of a node all of the group's GPUs: "cuda" must mean this worker's own one,
        # also for code that places by name (QLoRA's device_map, mean_token_loss).
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    cfg = RunConfig.model_validate(config["cfg"])
    run = RunPaths(Path(config["run_root"]))
    tracker = None
    if rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        tracker = _worker_tracker(cfg, run, config["tracking_stamp"])
    with advice_on_out_of_memory(cfg, run):
        result = train_sft(cfg, run, config["dataset"], resume=config["resume"],
                           on_metrics=tracker.log_metrics if tracker is not None else None,
                           training_overrides=config["overrides"])
    result = _global_tokens(result)
    # Every worker must report the same number of times; only rank 0's checkpoint carries anything.
    if rank != 0:
        ray.train.report({"rank": rank}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / RESULT_FILE).write_text(json.dumps(result.to_json()))
        if config["deliver_trained"]:
            trained = run.trained_for(cfg.method.type)
            shutil.copytree(trained, folder / trained.name)
            if run.metrics.is_file():
                shutil.copy2(run.metrics, folder / run.metrics.name)
        ray.train.report({"rank": 0, "steps": result.steps}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _global_tokens(result: TrainResult) -> TrainResult:
    """Each worker counted the tokens of its own batches; the run's throughput is their sum (a collective)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return result
    total = torch.tensor([result.tokens_seen], dtype=torch.long)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    result.tokens_seen = int(total.item())
    result.tokens_per_second = round(result.tokens_seen / result.train_seconds, 1) if result.train_seconds else 0.0
    return result


def _worker_tracker(cfg: RunConfig, run: RunPaths, stamp: str | None) -> Any:
    """Rank 0 logs into the driver's MLflow run: the run-id stamp says which (written here when rank 0's
    filesystem is not the driver's)."""
    if not cfg.track.enabled:
        return None
    from tunelab.track import RUN_ID_FILE, Tracker

    if stamp is not None and not (run.root / RUN_ID_FILE).is_file():
        (run.root / RUN_ID_FILE).write_text(stamp)
    return Tracker(cfg, run)


def _tracking_stamp(run: RunPaths) -> str | None:
    from tunelab.track import RUN_ID_FILE

    path = run.root / RUN_ID_FILE
    return path.read_text() if path.is_file() else None


def portable_config(cfg: RunConfig, run: RunPaths) -> RunConfig:
    """The config with every local path made absolute: Ray workers do not start in the driver's folder."""
    copy = cfg.model_copy(deep=True)
    copy.output.dir = run.root.resolve()
    if Path(copy.model.name).exists():
        copy.model.name = str(Path(copy.model.name).resolve())
    if copy.model.cache_dir is not None:
        copy.model.cache_dir = copy.model.cache_dir.resolve()
    if copy.model.adapter_from is not None:
        copy.model.adapter_from = copy.model.adapter_from.resolve()
    return copy


def _storage_path(cfg: RunConfig, run: RunPaths) -> str:
    path = cfg.cluster.storage_path
    if path is None:
        return str((run.root / "ray").resolve())
    return path if "://" in path else str(Path(path).resolve())


def connect_ray(cfg: RunConfig, log_to_driver: bool = True) -> bool:
    """Use the Ray session already open in this process, connect to cluster.ray_address, or start a local
    cluster for this run. Returns whether this call started one (and should stop it). `log_to_driver`: show the
    workers' output here (a sweep's trials keep theirs in Ray's logs and their run folders)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.cluster.ray_address
    if address is None:
        # A cluster that lives only for this run, on this machine: no token to write or share, and no dashboard
        # (it needs packages ray[train] does not bring).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"worker_process_setup_hook": "tunelab.cluster.ray_runner.quiet_worker_logs"})
        return True
    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cluster.ray_address: cannot connect to Ray at {address}: {first}") from None
    return True


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process of a local cluster: without a dashboard, Ray Train's placement-group
    watcher cannot query actor state and warns about it every few seconds, burying the training output."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # On a busy small machine the controller's resource request to Ray's autoscaling coordinator can time out; Ray
    # logs it with a traceback while saying it is safe to ignore (a local cluster has no autoscaler to ask).
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client").setLevel(
        logging.ERROR)


def _fit(trainer: Any) -> Any:
    """trainer.fit(), with a worker's TunelabError (bad data, NaN loss) surfacing as itself, one line."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as err:
        raise training_failure(err) from None


def training_failure(err: BaseException) -> TunelabError:
    """The error to show for a failed fit: a worker's own TunelabError as it was raised (a bad row, a NaN
    loss), else one line per failed worker (killed for memory, a lost node; details are in the Ray log)."""
    failures = getattr(err, "worker_failures", None) or {}
    for failure in failures.values():
        cause = user_error(failure)
        if cause is not None:
            return cause
    lines = [f"cluster: Ray worker {rank} failed: {first_line(failure)}" for rank, failure in sorted(failures.items())]
    return TunelabError(*(lines or [f"cluster: Ray training failed: {first_line(err)}"]))


def first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def user_error(failure: BaseException) -> TunelabError | None:
    """Find a TunelabError inside a worker failure (Ray wraps it in its own exception types)."""
    seen: BaseException | None = failure
    while seen is not None:
        cause = getattr(seen, "cause", None)  # RayTaskError: the original exception (its class mixes both in)
        if isinstance(seen, TunelabError) and not isinstance(cause, TunelabError):
            return seen
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return None


def _collect(checkpoint: Any, run: RunPaths) -> TrainResult:
    """Rank 0's TrainResult, and the adapter and loss curve if they did not land in this run folder already."""
    if checkpoint is None:
        raise TunelabError(f"cluster: training finished without a result from rank 0 (run folder {run.root})")
    run.root.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        data = json.loads((folder / RESULT_FILE).read_text())
        for target in (run.adapter, run.model):
            if (folder / target.name).is_dir() and not target.exists():
                with atomic_dir(target) as tmp:
                    shutil.copytree(folder / target.name, tmp, dirs_exist_ok=True)
        if (folder / run.metrics.name).is_file() and not run.metrics.is_file():
            shutil.copy2(folder / run.metrics.name, run.metrics)
    if not run.holds_trained_folder:
        raise TunelabError(f"cluster: rank 0 trained, but {run.root} holds no adapter; put the run folder on storage "
                           "every node shares, or set cluster.storage_path to an object-store URI")
    return TrainResult(**data)
