"""The eval stage on a Ray worker: `tunelab run` with `cluster.eval_on` resolving to worker.

Training ran on the workers; the driver that follows it may have no GPU at all (a KubeRay head pod is started
with none, and with `num-cpus: 0`). Evaluating there would generate every answer of base, tuned and few-shot on
its CPU. So the eval runs as one Ray task holding one training worker's resources (its GPU): the same
`evaluate_run`, reading the adapter and the data splits from the run folder and writing eval/ back into it,
which is why the run folder must be on storage every node sees. The driver then records the result (manifest,
MLflow run) as after a local eval.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.cluster.ray_runner import connect_ray, first_line, portable_config, user_error
from tunelab.config import RunConfig
from tunelab.errors import RunFolderError, TunelabError


def evaluate_on_worker(cfg: RunConfig, run: RunPaths) -> Any:
    """evaluate_run(cfg, run) in a Ray task with one worker's resources; returns its EvalResult."""
    import ray
    from ray.exceptions import RayError

    resources = cfg.cluster.worker_resources()
    options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 1.0), "num_gpus": resources.pop("GPU", 0.0),
                               "max_retries": 0}  # a retry would write a second eval over the first one's
    if resources:
        options["resources"] = resources
    task = ray.remote(_eval_task).options(**options)
    started_here = connect_ray(cfg)
    try:
        return ray.get(task.remote(portable_config(cfg, run).model_dump(mode="json"), str(run.root.resolve())))
    except RayError as err:
        cause = user_error(err)
        if cause is not None:
            raise cause from None
        raise TunelabError(f"cluster: the eval on a Ray worker failed: {first_line(err)} (cluster.eval_on: driver "
                           "evaluates in this process instead)") from None
    finally:
        if started_here:
            ray.shutdown()


def _eval_task(cfg_json: dict[str, Any], root: str) -> Any:
    """The body of the Ray task (package level, so a worker can import it)."""
    import torch

    from tunelab.eval.run import evaluate_run

    cfg = RunConfig.model_validate(cfg_json)
    run = RunPaths(Path(root))
    if not run.holds_trained_folder:
        raise RunFolderError(f"cluster.eval_on: the Ray worker on {socket.gethostname()} does not see the trained run "
                             f"in {root}: a worker evaluates from the run folder, so it must be on storage every "
                             "node shares; set cluster.eval_on: driver to evaluate in the driver instead")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # Ray shows the task its own GPU(s) only
    return evaluate_run(cfg, run, placement=f"Ray worker (pid {os.getpid()})")

