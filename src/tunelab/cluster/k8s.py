"""Kubernetes manifests, from the run config: a KubeRay RayJob that runs `tunelab run` (or `tunelab train`), and a
KServe InferenceService that serves the base model with registered LoRA adapters on vLLM.

Both are plain dicts (no Kubernetes client needed) written as YAML; their shape follows the published APIs
(KubeRay ray.io/v1 RayJob with its RayClusterSpec, KServe serving.kserve.io/v1beta1 InferenceService), and
tests validate them against JSON Schemas written from those CRDs. Combinations that cannot work are refused
with one line each, before anything is written.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tunelab.config import RunConfig
from tunelab.config_file import validate_config
from tunelab.errors import ConfigError
from tunelab.redaction import uri_credentials

CONFIG_MOUNT = "/etc/tunelab"
CONFIG_KEY = "config.yaml"
# KubeRay derives the RayCluster, head service and pod names from the RayJob's name by appending suffixes;
# a short name keeps every derived one within the 63 characters Kubernetes allows.
MAX_NAME = 40
# Where each bundled model comes from for a serving runtime that downloads it (KServe's hf:// storage).
BASE_MODEL_URIS = {"smollm2-135m-instruct": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}
GPU = "nvidia.com/gpu"
BASE_SERVED_NAME = "base"  # the model id the base answers to, as with `tunelab serve`


def k8s_name(text: str) -> str:
    """A DNS-1123 label from any text: lower case, [a-z0-9-], starting with a letter."""
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    slug = re.sub(r"-{2,}", "-", slug)
    if not slug or not slug[0].isalpha():
        slug = f"tl-{slug}".rstrip("-")
    return slug[:MAX_NAME].rstrip("-")


def check_rayjob(cfg: RunConfig) -> None:
    """Every reason the RayJob could not run, one line each."""
    k, c = cfg.k8s, cfg.cluster
    problems = []
    if not k.image:
        problems.append("k8s.image: set the container image that has tunelab installed "
                        "(e.g. registry.example.com/tunelab:0.1.0)")
    if c.use_gpu and k.gpu_per_worker == 0:
        problems.append("k8s.gpu_per_worker: is 0 but cluster.use_gpu is true; give each worker pod at least one GPU")
    wanted = c.worker_resources().get("GPU", 0)
    if c.use_gpu and wanted > k.gpu_per_worker > 0:
        problems.append(f"cluster.resources_per_worker: asks {wanted:g} GPUs per worker but a worker pod has "
                        f"k8s.gpu_per_worker={k.gpu_per_worker}")
    # KubeRay starts each pod's Ray with num-cpus = the container's CPU limit, rounded up: a worker asking more
    # can never be placed, and the job would wait for it forever, holding the other pods (and their GPUs).
    pod_cpus = _cpu_count(k.cpu_per_worker)
    per_pod = _workers_per_pod(cfg)
    cpus = c.worker_resources().get("CPU", 0) * per_pod
    if pod_cpus is None:
        problems.append(f"k8s.cpu_per_worker: {k.cpu_per_worker!r} is not a Kubernetes CPU quantity (e.g. 4 or 500m)")
    elif cpus > pod_cpus:
        problems.append(f"cluster.resources_per_worker: a worker pod holds {per_pod} worker(s) asking "
                        f"{c.worker_resources().get('CPU', 0):g} CPUs each, {cpus:g} in all, but has "
                        f"k8s.cpu_per_worker={k.cpu_per_worker} (Ray sees {pod_cpus}); workers could never start: "
                        f"raise cpu_per_worker to {math.ceil(cpus)} or lower the workers' CPU")
    problems += _credentials_outside_secrets(cfg)
    if k.storage.uri and cfg.track.enabled and not cfg.track.tracking_uri:
        problems.append("track.tracking_uri: with k8s.storage.uri the pods share no volume, so the default sqlite "
                        "store would vanish with the head pod; set an MLflow server (http://...)")
    if cfg.track.tracking_uri and uri_credentials(cfg.track.tracking_uri) and "MLFLOW_TRACKING_URI" not in k.secret_env:
        problems.append("track.tracking_uri: holds credentials, which the pods' env would show in clear; put the URI "
                        "in a Kubernetes Secret and set k8s.secret_env: {MLFLOW_TRACKING_URI: SECRET_NAME/KEY}")
    if k.storage.uri and uri_credentials(k.storage.uri):
        problems.append("k8s.storage.uri: holds credentials, which the manifest would show in clear; give the pods "
                        "access through k8s.service_account or k8s.secret_env (e.g. AWS_SECRET_ACCESS_KEY)")
    if k.job == "run" and k.storage.uri and cfg.cluster.eval_on != "driver":
        problems.append("k8s.job: run evaluates after training, and with k8s.storage.uri the pods share no run folder, "
                        "so no GPU worker can read the adapter: the eval would run on the head pod (no GPU, "
                        f"k8s.head_cpu={k.head_cpu}, head_memory={k.head_memory}); set cluster.eval_on: driver (and "
                        "size the head) to accept that, use k8s.storage.pvc, or set k8s.job: train")
    if k.job == "train" and cfg.track.register_as:
        problems.append("track.register_as: the job only trains (k8s.job: train), so it would register nothing; set "
                        "k8s.job: run (train, evaluate, register)")
    if k.storage.uri and "://" not in k.storage.uri:
        problems.append(f"k8s.storage.uri: expected an object-store URI such as s3://bucket/prefix, got {k.storage.uri!r}")
    if problems:
        raise ConfigError(*problems)


def _cpu_count(quantity: str) -> int | None:
    """The CPUs KubeRay gives Ray for a container CPU limit ("4", "2.5", "500m"): rounded up, as Kubernetes'
    Quantity.Value() does."""
    text = quantity.strip()
    try:
        value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return math.ceil(value) if value > 0 else None


def _credentials_outside_secrets(cfg: RunConfig) -> list[str]:
    """Settings holding credentials that the job's ConfigMap would carry: tunelab writes them there as ***, so the
    job would fail; the pods get credentials from Kubernetes Secrets (k8s.secret_env) instead."""
    from tunelab.redaction import redact_uris

    handled = {"track.tracking_uri", "k8s.storage.uri"}  # refused or routed through secret_env by the checks above
    found = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, str) and key not in handled and redact_uris(value) != value:
            found.append(f"{key}: holds credentials, which the job's ConfigMap would show (tunelab writes them as "
                         "***, and the job would then fail); give the pods access through k8s.secret_env "
                         "(e.g. HF_TOKEN: SECRET_NAME/KEY) instead")

    walk(cfg.model_dump(mode="json", exclude={"k8s"}), "")
    return found


def job_config(cfg: RunConfig) -> RunConfig:
    """The config the job runs: Ray backend on the job's own cluster, Ray storage on the object store if any.
    Validated here as a whole, as the pods will read it: a combination they would refuse is refused now."""
    raw = cfg.model_dump(mode="json")
    cluster = raw["cluster"]
    cluster.update(backend="ray", ray_address="auto")  # the RayJob's driver runs on the head of its own cluster
    if cfg.k8s.storage.uri:
        cluster["storage_path"] = cfg.k8s.storage.uri
    if cfg.cluster.eval_on == "auto" and cfg.k8s.storage.pvc:
        # The head pod is small and holds no GPU (it runs the driver only); the workers share the run folder.
        cluster["eval_on"] = "worker"
    return validate_config(raw, "the job's config")


def rayjob_manifests(cfg: RunConfig, config_yaml: str) -> list[dict[str, Any]]:
    """[ConfigMap with the run config, RayJob running `tunelab run` (k8s.job) on it]."""
    check_rayjob(cfg)
    k, c = cfg.k8s, cfg.cluster
    name = k8s_name(k.name or Path(cfg.output.dir).name)
    labels = {"app.kubernetes.io/name": "tunelab", "app.kubernetes.io/instance": name}
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": k.namespace, "labels": labels},
        "data": {CONFIG_KEY: config_yaml},
    }
    env = env_vars(_env(cfg), k.secret_env)
    volumes: list[dict[str, Any]] = [{"name": "tunelab-config", "configMap": {"name": f"{name}-config"}}]
    mounts: list[dict[str, Any]] = [{"name": "tunelab-config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    if k.storage.pvc:
        volumes.append({"name": "tunelab-data", "persistentVolumeClaim": {"claimName": k.storage.pvc}})
        mounts.append({"name": "tunelab-data", "mountPath": k.storage.mount_path})
    head = _pod_template(cfg, "ray-head", {"cpu": k.head_cpu, "memory": k.head_memory}, env, volumes, mounts,
                         ports=[{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                                {"containerPort": 10001, "name": "client"}], labels=labels)
    worker_resources = {"cpu": k.cpu_per_worker, "memory": k.memory_per_worker}
    if c.use_gpu:
        worker_resources[GPU] = str(k.gpu_per_worker)
    worker = _pod_template(cfg, "ray-worker", worker_resources, env, volumes, mounts, ports=None, labels=labels)
    worker["spec"].update(_placement(cfg))
    replicas = _worker_pods(cfg)
    workdir = k.storage.mount_path if k.storage.pvc else None
    command = f"tunelab {k.job} {shlex.quote(f'{CONFIG_MOUNT}/{CONFIG_KEY}')}"
    spec: dict[str, Any] = {
        "entrypoint": f"cd {shlex.quote(workdir)} && {command}" if workdir else command,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "backoffLimit": 0,  # a retry would start a second run into the same run folder
        "rayClusterSpec": {
            "rayVersion": k.ray_version,
            "headGroupSpec": {
                # The head runs the driver (data prep, tracking), never a training worker.
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                "template": head,
            },
            "workerGroupSpecs": [{
                "groupName": "gpu-workers" if c.use_gpu else "cpu-workers",
                "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
                "rayStartParams": {},
                "template": worker,
            }],
        },
    }
    if k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": name, "namespace": k.namespace, "labels": labels}, "spec": spec}
    return [config_map, rayjob]


def _worker_pods(cfg: RunConfig) -> int:
    """Pods for cluster.num_workers training workers."""
    return math.ceil(cfg.cluster.num_workers / _workers_per_pod(cfg))


def _workers_per_pod(cfg: RunConfig) -> int:
    """As many workers per pod as its GPUs hold (one on CPU)."""
    c, k = cfg.cluster, cfg.k8s
    if not c.use_gpu:
        return 1
    return max(1, int(k.gpu_per_worker // c.worker_resources().get("GPU", 1)))


def _env(cfg: RunConfig) -> dict[str, str]:
    env = {"TUNELAB_CACHE": f"{cfg.k8s.storage.mount_path}/.cache/tunelab"} if cfg.k8s.storage.pvc else {}
    if cfg.track.tracking_uri and "MLFLOW_TRACKING_URI" not in cfg.k8s.secret_env:
        env["MLFLOW_TRACKING_URI"] = cfg.track.tracking_uri
    env.update(cfg.k8s.env)
    return env


def env_vars(plain: dict[str, str], secret: dict[str, str]) -> list[dict[str, Any]]:
    """A container's env: plain values, and secrets as references (valueFrom.secretKeyRef), never values."""
    out: dict[str, dict[str, Any]] = {name: {"name": name, "value": value} for name, value in plain.items()}
    for name, ref in secret.items():
        secret_name, _, key = ref.partition("/")
        out[name] = {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
    return [out[name] for name in sorted(out)]


def _pod_template(cfg: RunConfig, container: str, resources: dict[str, str], env: list[dict[str, str]],
                  volumes: list[dict[str, Any]], mounts: list[dict[str, Any]], ports: list[dict[str, Any]] | None,
                  labels: dict[str, str]) -> dict[str, Any]:
    main: dict[str, Any] = {
        "name": container, "image": cfg.k8s.image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": env, "volumeMounts": mounts,
    }
    if ports:
        main["ports"] = ports
    pod: dict[str, Any] = {"containers": [main], "volumes": volumes}
    if cfg.k8s.service_account:
        pod["serviceAccountName"] = cfg.k8s.service_account
    if cfg.k8s.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in cfg.k8s.image_pull_secrets]
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def _placement(cfg: RunConfig) -> dict[str, Any]:
    """Where the pods that do the work (training workers, the predictor) may run: node labels and tolerations."""
    out: dict[str, Any] = {}
    if cfg.k8s.node_selector:
        out["nodeSelector"] = dict(cfg.k8s.node_selector)
    if cfg.k8s.tolerations:
        out["tolerations"] = [t.manifest() for t in cfg.k8s.tolerations]
    return out


# -- KServe -------------------------------------------------------------------------------------------


def adapter_reference(ref: str) -> str:
    """NAME means its champion; models:/NAME@ALIAS and models:/NAME/VERSION are used as given."""
    if ref.startswith("models:/"):
        return ref
    return f"models:/{ref}" if ("@" in ref or "/" in ref) else f"models:/{ref}@champion"


def inference_service(cfg: RunConfig, name: str, adapters: list[tuple[str, Any]], base_uri: str | None = None,
                      runtime: str | None = None, lora_ranks: dict[str, int] | None = None) -> dict[str, Any]:
    """A KServe InferenceService serving the base model on vLLM (huggingface model format) with LoRA adapters.

    `adapters`: (served name, registered model version) pairs; every version must come from the same base.
    The adapters are read from the shared volume (k8s.storage.pvc), where `tunelab k8s rayjob` trains."""
    k = cfg.k8s
    bases = {mv.tags.get("tunelab.base_model", "") for _, mv in adapters}
    problems = []
    if len(bases) > 1:
        problems.append(f"kserve: the adapters were trained on different base models ({', '.join(sorted(bases))}); "
                        "one InferenceService serves one base")
    base = bases.pop() if len(bases) == 1 else cfg.model.name
    storage_uri = base_uri or BASE_MODEL_URIS.get(base)
    if base_uri and uri_credentials(base_uri):
        problems.append("--base-uri: holds credentials, which the manifest would show in clear; give the predictor "
                        "access through k8s.service_account (or a storage secret it names) instead")
    elif storage_uri is None:
        problems.append(f"kserve: no download location known for base model {base!r}; pass --base-uri "
                        "(hf://ORG/MODEL, s3://..., or pvc://CLAIM/path)")
    if not k.storage.pvc:
        problems.append("k8s.storage.pvc: the adapters are served from the shared volume the training job wrote; "
                        "set the PersistentVolumeClaim")
    if len({mv.tags.get("tunelab.chat_template") for _, mv in adapters}) > 1:
        problems.append("kserve: the adapters were trained with different chat templates; vLLM applies one template "
                        "to every adapter it serves: one InferenceService per template")
    lora_modules, paths = [], []
    for served, mv in adapters:
        path = _adapter_path(mv, k.storage.mount_path)
        if path is None:
            problems.append(f"kserve: {mv.name} version {mv.version} was trained in {mv.tags.get('tunelab.run_dir')}, "
                            f"outside the shared volume at {k.storage.mount_path}; train it with tunelab k8s rayjob "
                            "(or copy its run folder onto the volume)")
        else:
            lora_modules.append(f"{served}={path}")
            paths.append(path)
    # The base answers as "base", as with `tunelab serve` and its vLLM command: never under an adapter's name (vLLM
    # resolves a name shared by the base and an adapter differently from one release to the next).
    if any(served == BASE_SERVED_NAME for served, _ in adapters):
        problems.append(f"kserve: an adapter may not be served as '{BASE_SERVED_NAME}', the base model's name")
    if problems:
        raise ConfigError(*problems)
    args = ["--model_name", BASE_SERVED_NAME, "--backend", "vllm", "--enable-lora", "--lora-modules", *lora_modules]
    if paths and adapters[0][1].tags.get("tunelab.chat_template"):
        # The template the adapters were trained with (saved beside each adapter), not the base model's.
        args += ["--chat-template", f"{paths[0]}/chat_template.jinja"]
    if lora_ranks:  # served name: LoRA rank, rounded up to a --max-lora-rank vLLM accepts
        from tunelab.serve.adapters import vllm_max_lora_rank

        args += ["--max-lora-rank", str(vllm_max_lora_rank(lora_ranks))]
    gpus = k.gpu_per_worker if k.gpu_per_worker > 0 else None
    resources = {"cpu": k.cpu_per_worker, "memory": k.memory_per_worker}
    if gpus:
        resources[GPU] = str(gpus)
    if gpus and gpus > 1:  # vLLM uses one GPU unless told to shard the model over the pod's others
        args += ["--tensor-parallel-size", str(gpus)]
    model: dict[str, Any] = {
        "modelFormat": {"name": "huggingface"},
        "storageUri": storage_uri,
        "args": args,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "tunelab-data", "mountPath": k.storage.mount_path, "readOnly": True}],
    }
    if runtime:
        model["runtime"] = runtime
    env = env_vars(k.env, k.secret_env)
    if env:
        model["env"] = env
    predictor: dict[str, Any] = {
        "minReplicas": 1,
        "model": model,
        "volumes": [{"name": "tunelab-data", "persistentVolumeClaim": {"claimName": k.storage.pvc, "readOnly": True}}],
    }
    if k.service_account:  # also how KServe's storage initializer gets HF_TOKEN for a gated hf:// base model
        predictor["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        predictor["imagePullSecrets"] = [{"name": name} for name in k.image_pull_secrets]
    predictor.update(_placement(cfg))
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": k8s_name(name), "namespace": k.namespace,
                     "labels": {"app.kubernetes.io/name": "tunelab", "app.kubernetes.io/component": "serving"}},
        "spec": {"predictor": predictor},
    }


def _adapter_path(mv: Any, mount_path: str) -> str | None:
    """The adapter folder of a registered version as the serving pod sees it (None: not on the shared volume)."""
    run_dir = mv.tags.get("tunelab.run_dir")
    if not run_dir:
        return None
    folder = PurePosixPath(run_dir) / "adapter"
    mount = PurePosixPath(mount_path)
    return str(folder) if folder.is_relative_to(mount) else None


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for kubectl: no &anchors for repeated lists, multi-line strings (the config) as | blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ManifestDumper.add_representer(str, _string)


def dump_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False, width=120)
