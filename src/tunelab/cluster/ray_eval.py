"""The eval stage on a Ray worker: `tunelab run` with `cluster.eval_on` resolving to worker.

Training ran on the workers; the driver that follows it may have no GPU at all (a KubeRay head pod is started
with none, and with `num-cpus: 0`). Generating every answer of base, tuned and few-shot there would run on its
CPU. So the part of the eval that needs the model (`measure_run`: generation and scoring) runs in one Ray actor
holding one training worker's resources, its GPU included, reading the adapter and the data splits from the run
folder, which is why that folder must be on storage every node sees. The actor writes nothing: its metrics and
rows come back, and the driver records them as after a local eval (`record_eval`: the judge, whose endpoint and
key are the driver's, the gate, the report files, the manifest and the MLflow run).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.cluster.ray_runner import connect_ray, first_line, portable_config, user_error
from tunelab.config import RunConfig
from tunelab.errors import RunFolderError, TunelabError
from tunelab.progress import console

NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def evaluate_on_worker(cfg: RunConfig, run: RunPaths) -> Any:
    """evaluate_run(cfg, run), its generation on a Ray worker with one worker's resources; returns its EvalResult."""
    import ray
    from ray.exceptions import RayError

    from tunelab.eval.run import record_eval

    resources = cfg.cluster.worker_resources()
    # An actor, not a bare task: it holds its resources from the moment it starts, so waiting for a free worker
    # (bounded by cluster.eval_wait_s) is told apart from the eval itself (which takes as long as it takes).
    worker_class = ray.remote(EvalWorker).options(**actor_options(resources))
    started_here = connect_ray(cfg)
    worker = None
    try:
        console.print(f"eval: on a Ray worker holding {resources} (cluster.eval_on: {cfg.cluster.eval_on}); "
                      "waiting for one to be free")
        worker = worker_class.remote()
        host = wait_until_placed(worker, resources, cfg.cluster.eval_wait_s)
        console.print(f"eval: generating on {host}")
        ref = worker.measure.remote(portable_config(cfg, run).model_dump(mode="json"), str(run.root.resolve()),
                                    os.getcwd())
        metrics, rows = ray.get(ref)
    except RayError as err:
        cause = user_error(err)
        if cause is not None:
            raise cause from None
        raise TunelabError(f"cluster: the eval on a Ray worker failed: {first_line(err)} (cluster.eval_on: driver "
                           "evaluates in this process instead)") from None
    finally:  # also on Ctrl-C: the eval must not go on, on a remote cluster, after this process gave up on it
        if worker is not None:
            ray.kill(worker)
        if started_here:
            ray.shutdown()
    return record_eval(cfg, run, metrics, rows)


def wait_until_placed(worker: Any, resources: dict[str, float], wait_s: float, every_s: float = 60.0) -> str:
    """Wait until the actor `worker` holds its resources and return its host; say what is free every `every_s`;
    a TunelabError after `wait_s` seconds."""
    import ray

    ready = worker.host.remote()
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        done, _ = ray.wait([ready], timeout=max(0.0, min(every_s, left)))
        if done:
            return ray.get(ready)
        free = {k: v for k, v in ray.available_resources().items() if k in resources or k == "memory"}
        if time.monotonic() >= deadline:
            raise TunelabError(
                f"cluster.eval_wait_s: no Ray worker with {resources} came free within {wait_s:g} s (free now: "
                f"{_rounded(free)}); the trained run is kept: evaluate it later with `tunelab eval RUN_DIR`, wait "
                "longer (cluster.eval_wait_s), or set cluster.eval_on: driver")
        console.print(f"eval: still waiting for a Ray worker with {resources}; free now: {_rounded(free)}")


def _rounded(resources: dict[str, float]) -> dict[str, float | str]:
    return {k: f"{v / 2**30:.1f} GiB" if k == "memory" else round(v, 2) for k, v in sorted(resources.items())}


def actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """ray.remote options for the eval actor: what one training worker holds (Ray Train's resources_per_worker)."""
    left = dict(resources)
    # No restart and no retry: either would generate every answer again, unasked.
    options: dict[str, Any] = {"num_cpus": left.pop("CPU", 1.0), "num_gpus": left.pop("GPU", 0.0),
                               "max_restarts": 0, "max_task_retries": 0}
    if "memory" in left:  # bytes of memory to reserve: its own option, not a custom resource
        options["memory"] = left.pop("memory")
    if left:
        options["resources"] = left
    return options


class EvalWorker:
    """The Ray actor that evaluates: `host` answers once it holds its resources, `measure` runs the eval."""

    def host(self) -> str:
        return socket.gethostname()

    def measure(self, cfg_json: dict[str, Any], root: str, driver_cwd: str) -> tuple[dict[str, Any], list[Any]]:
        return _measure_task(cfg_json, root, driver_cwd)


def _measure_task(cfg_json: dict[str, Any], root: str, driver_cwd: str) -> tuple[dict[str, Any], list[Any]]:
    """The eval on the worker (package level, so a worker can import it)."""
    import ray
    import torch

    from tunelab.eval.run import measure_run

    cfg = RunConfig.model_validate(cfg_json)
    run = RunPaths(Path(root))
    if not run.holds_trained_folder:
        raise RunFolderError(f"cluster.eval_on: the Ray worker on {socket.gethostname()} does not see the trained run "
                             f"in {root}: a worker evaluates from the run folder, so it must be on storage every "
                             "node shares; set cluster.eval_on: driver to evaluate in the driver instead")
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpus and cfg.model.device == "auto":
        cfg.model.device = "cpu"  # Ray 2.60 hides no GPU from a task that reserved none: use none
    elif gpus and torch.cuda.is_available():
        # Ray shows the task only its own GPU(s), numbered from 0, unless told not to.
        torch.cuda.set_device(int(gpus[0]) if os.environ.get(NOSET_CUDA) else 0)
    # The eval's relative paths (suite files, a JSON Schema, a metric module beside the config) are the driver's.
    here, path_before = os.getcwd(), list(sys.path)
    if Path(driver_cwd).is_dir():
        os.chdir(driver_cwd)
        sys.path.insert(0, driver_cwd)
    try:
        return measure_run(cfg, run, placement=f"Ray worker (pid {os.getpid()})")
    finally:
        os.chdir(here)
        sys.path[:] = path_before
