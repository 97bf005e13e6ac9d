"""Config sections for scale-out: `cluster` (Ray Train) and `k8s` (the KubeRay RayJob tunelab emits).

Part of the one RunConfig (tunelab.config); kept apart because only the cluster and k8s commands read them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config_section import Section


class ClusterConfig(Section):
    backend: Literal["local", "ray"] = Field(
        "local", description="local: train in this process; ray: the same train stage on Ray Train workers (DDP or FSDP)."
    )
    num_workers: int = Field(2, gt=0, description="Ray: training workers (one process each; the global batch is "
                             "train.batch_size x gradient_accumulation_steps x num_workers).")
    use_gpu: bool = Field(False, description="Ray: give each worker a GPU (NCCL) instead of CPU only (gloo).")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray: resources each worker reserves, e.g. {CPU: 4, GPU: 1}. "
        "Default: {CPU: 1}, plus {GPU: 1} with use_gpu.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full model copy per worker, gradients averaged; fsdp: parameters, gradients and "
        "optimizer state sharded across GPU workers (FSDP2).",
    )
    ray_address: str | None = Field(
        None, description="Ray: connect to this running cluster (auto, ray://host:10001, or host:6379); "
        "default: start a local one for the run.",
    )
    storage_path: str | None = Field(
        None, description="Ray: where Ray Train keeps its own results (a folder all nodes share, or an s3:// / gs:// "
        "URI); the run's final adapter and loss curve come back from there. Default: RUN_DIR/ray.",
    )
    eval_on: Literal["auto", "driver", "worker"] = Field(
        "auto", description="Ray: where `tunelab run` generates and scores after training. worker: a Ray actor "
        "holding one worker's resources (its GPU), reading the adapter and splits from the run folder, which every "
        "node must then share; driver: this process. auto: a worker with use_gpu (the driver, e.g. a KubeRay head "
        "pod, may have no GPU) unless storage_path is an object store (nodes share no folder), else the driver.",
    )
    eval_wait_s: float = Field(
        900.0, gt=0, description="Ray, eval on a worker: how long `tunelab run` waits for a worker's resources to "
        "come free before it stops with an error (the trained run is kept; `tunelab eval RUN_DIR` evaluates it later).",
    )

    @model_validator(mode="after")
    def _workers_fit_the_hardware(self) -> ClusterConfig:
        gpus = (self.resources_per_worker or {}).get("GPU")
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("cluster.strategy: fsdp shards the model across GPUs and needs cluster.use_gpu: true; "
                             "use strategy: ddp on CPU workers")
        if self.use_gpu and gpus is not None and gpus <= 0:
            raise ValueError("cluster.resources_per_worker: GPU must be above 0 with cluster.use_gpu: true")
        if not self.use_gpu and gpus:
            raise ValueError("cluster.resources_per_worker: reserves GPUs but cluster.use_gpu is false; "
                             "set use_gpu: true or drop GPU")
        if self.eval_on == "worker" and self.storage_path and "://" in self.storage_path:
            raise ValueError("cluster.eval_on: worker reads the run folder on a Ray worker, but with an object-store "
                             "storage_path the nodes share no folder; use eval_on: driver (or a shared volume)")
        return self

    def evaluates_on_worker(self) -> bool:
        """Whether `tunelab run` evaluates in a Ray actor (see eval_on)."""
        if self.backend != "ray" or self.eval_on == "driver":
            return False
        shared_folder = not (self.storage_path and "://" in self.storage_path)
        return self.eval_on == "worker" or (self.use_gpu and shared_folder)

    def worker_resources(self) -> dict[str, float]:
        """What each Ray worker reserves: the configured resources, or one CPU; with use_gpu one GPU unless they
        say how many (Ray Train adds it so)."""
        resources = dict(self.resources_per_worker) if self.resources_per_worker else {"CPU": 1.0}
        if self.use_gpu:
            resources.setdefault("GPU", 1.0)
        return resources


class K8sStorageConfig(Section):
    pvc: str | None = Field(
        None, description="A PersistentVolumeClaim (ReadWriteMany) mounted on the head and every worker at "
        "mount_path: data, run folders and checkpoints live there, shared by all pods.",
    )
    uri: str | None = Field(
        None, description="An object-store URI (s3://bucket/prefix, gs://...) for Ray Train's storage; the final "
        "adapter and loss curve come back through it. Use when pods share no volume (needs track.tracking_uri).",
    )
    mount_path: str = Field("/mnt/tunelab", description="Where the PVC is mounted; the job runs in this folder, so "
                            "relative data paths and output.dir land on the volume.")

    @model_validator(mode="after")
    def _one_kind(self) -> K8sStorageConfig:
        if self.pvc and self.uri:
            raise ValueError("k8s.storage: set either pvc (a shared volume) or uri (an object store), not both")
        if not self.mount_path.startswith("/"):
            raise ValueError(f"k8s.storage.mount_path: must be an absolute path, got {self.mount_path!r}")
        return self


class K8sToleration(Section):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(None, description="The taint's key; none (with operator Exists) tolerates every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Equal matches `value`; Exists any value.")
    value: str | None = Field(None, description="The taint's value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="The taint effect tolerated; none: every effect.")
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute only: how long the pod stays on a node after the taint appears.")

    def problem(self) -> str | None:
        """What the API server would refuse in this toleration, or None."""
        if self.operator == "Exists" and self.value:
            return "operator Exists matches any value: leave value out"
        if self.key is None and self.operator != "Exists":
            return "a toleration without a key must use operator: Exists"
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            return "toleration_seconds applies to effect NoExecute only"
        return None

    def manifest(self) -> dict[str, object]:
        out = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect,
               "tolerationSeconds": self.toleration_seconds}
        return {k: v for k, v in out.items() if v is not None}


class K8sConfig(Section):
    image: str | None = Field(
        None, description="Container image with tunelab and its dependencies installed (needed by tunelab k8s), "
        "e.g. registry.example.com/tunelab:0.1.0.",
    )
    namespace: str = Field("default", description="Kubernetes namespace of the emitted resources.")
    name: str | None = Field(None, description="Name of the RayJob and its ConfigMap; default: the run folder's name.")
    service_account: str | None = Field(None, description="ServiceAccount the pods run as (e.g. for object-store access).")
    gpu_per_worker: int = Field(1, ge=0, description="nvidia.com/gpu per Ray worker pod when cluster.use_gpu is true.")
    cpu_per_worker: str = Field("4", description="CPU request and limit of each worker pod (Kubernetes quantity).")
    memory_per_worker: str = Field("32Gi", description="Memory request and limit of each worker pod.")
    head_cpu: str = Field("2", description="CPU of the Ray head pod (it runs the driver, not training).")
    head_memory: str = Field("8Gi", description="Memory of the Ray head pod.")
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay needs it to match).")
    job: Literal["run", "train"] = Field(
        "run", description="What the RayJob runs: run (prepare, train, evaluate base vs tuned and, with "
        "track.register_as, register; a failed eval gate fails the job) or train (prepare and train only).",
    )
    ttl_seconds_after_finished: int = Field(
        300, ge=0, description="Seconds the finished job's RayCluster (its pods, GPUs and pod logs) stays before "
        "KubeRay deletes it; the RayJob object itself stays. Long values keep idle GPUs reserved.",
    )
    active_deadline_seconds: int | None = Field(
        None, gt=0, description="Fail the job if it runs longer than this (seconds); default: no limit."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the worker pods must match.")
    tolerations: list[K8sToleration] = Field(
        default_factory=list, description="Taints the worker and serving pods tolerate (GPU node pools are often "
        "tainted, e.g. nvidia.com/gpu with effect NoSchedule).",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets (kubernetes.io/dockerconfigjson) every pod pulls the image with: "
        "an image in a private registry.",
    )
    storage: K8sStorageConfig = Field(default_factory=K8sStorageConfig)
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for every pod "
                                "(plain values, visible in the manifest; secrets go in secret_env).")
    secret_env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables taken from Kubernetes Secrets, VAR: SECRET_NAME/KEY "
        "(e.g. HF_TOKEN: hf-credentials/token); the manifest holds only the reference (valueFrom.secretKeyRef).",
    )

    @field_validator("env")
    @classmethod
    def _no_plain_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        from tunelab.redaction import is_secret_key, uri_credentials

        for name, text in value.items():
            if is_secret_key(name) or uri_credentials(text):
                raise ValueError(f"k8s.env.{name}: looks like a secret, and k8s.env values are written in clear into "
                                 f"the manifest; put it in a Kubernetes Secret and set k8s.secret_env: "
                                 f"{{{name}: SECRET_NAME/KEY}} instead")
        return value

    @field_validator("tolerations")
    @classmethod
    def _valid_tolerations(cls, value: list[K8sToleration]) -> list[K8sToleration]:
        for i, toleration in enumerate(value):
            problem = toleration.problem()
            if problem:
                raise ValueError(f"k8s.tolerations[{i}]: {problem}")
        return value

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
                raise ValueError(f"k8s.image_pull_secrets[{i}]: {name!r} is not a Secret's name (lower-case letters, "
                                 "digits, '-' and '.')")
        return value

    @field_validator("secret_env")
    @classmethod
    def _secret_references(cls, value: dict[str, str]) -> dict[str, str]:
        for name, ref in value.items():
            secret, slash, key = ref.partition("/")
            if not (slash and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", secret)
                    and re.fullmatch(r"[-._a-zA-Z0-9]+", key)):
                # The value is not echoed: what was pasted here instead of a reference may be the secret itself.
                raise ValueError(f"k8s.secret_env.{name}: expected SECRET_NAME/KEY (a Kubernetes Secret and one of its "
                                 "keys, e.g. hf-credentials/token), not the value itself")
        return value
