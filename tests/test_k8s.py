"""`tunelab k8s rayjob` / `tunelab k8s kserve`: emitted manifests validate against JSON Schemas written from the
KubeRay and KServe APIs (tests/cluster_schemas.py), carry what the config says, and impossible combinations
are refused with one line each."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.cli_process import run_tunelab
from tests.cluster_schemas import CONFIG_MAP, INFERENCE_SERVICE, RAY_JOB
from tunelab.cluster.k8s import dump_yaml, inference_service, job_config, rayjob_manifests
from tunelab.config_file import dump_config, validate_config
from tunelab.errors import ConfigError, ServeError

GPU_CONFIG = {
    "data": {"train": "data/train.jsonl"},
    "output": {"dir": "runs/Order Extractor"},
    "cluster": {"num_workers": 4, "use_gpu": True, "strategy": "fsdp", "resources_per_worker": {"CPU": 4, "GPU": 1}},
    "track": {"tracking_uri": "http://mlflow.ml.svc:5000"},
    "k8s": {"image": "registry.example.com/tunelab:0.1.0", "namespace": "ml", "service_account": "trainer",
            "gpu_per_worker": 2, "cpu_per_worker": "8", "node_selector": {"gpu": "h100"},
            "storage": {"pvc": "tunelab-data"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "image_pull_secrets": ["registry-credentials"],
            "active_deadline_seconds": 7200},
}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
PULL_SECRETS = [{"name": "registry-credentials"}]


def config(**changes):
    raw = copy.deepcopy(GPU_CONFIG)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return validate_config(raw)


def emit(cfg) -> list[dict]:
    job = job_config(cfg)
    return list(yaml.safe_load_all(dump_yaml(rayjob_manifests(job, dump_config(job)))))


def test_rayjob_and_configmap_match_the_kuberay_api_and_carry_the_config():
    config_map, rayjob = emit(config())
    jsonschema.validate(config_map, CONFIG_MAP)
    jsonschema.validate(rayjob, RAY_JOB)

    spec = rayjob["spec"]
    assert rayjob["metadata"] == {"name": "order-extractor", "namespace": "ml", "labels": {
        "app.kubernetes.io/name": "tunelab", "app.kubernetes.io/instance": "order-extractor"}}
    # The whole pipeline: prepare, train on the workers, evaluate (the gate's exit status is the job's).
    assert spec["entrypoint"] == "cd /mnt/tunelab && tunelab run /etc/tunelab/config.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 300
    assert spec["activeDeadlineSeconds"] == 7200 and spec["submissionMode"] == "K8sJobMode"

    # The job's config is the user's, switched to the Ray backend on the job's own cluster.
    shipped = validate_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert (shipped.cluster.backend, shipped.cluster.ray_address, shipped.cluster.strategy) == ("ray", "auto", "fsdp")
    # The eval runs on a GPU worker, which sees the run folder on the shared volume; the head has no GPU.
    assert shipped.cluster.eval_on == "worker" and shipped.cluster.evaluates_on_worker()
    assert shipped.train == config().train and shipped.data == config().data

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]
    [group] = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]
    # 4 training workers of 1 GPU each on pods of 2 GPUs: 2 pods.
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2" and worker["nodeSelector"] == {"gpu": "h100"}
    assert worker["tolerations"] == TOLERATIONS and "tolerations" not in head  # the head needs no GPU node
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    for pod in (head, worker):
        assert pod["serviceAccountName"] == "trainer" and pod["imagePullSecrets"] == PULL_SECRETS
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml.svc:5000"} in pod["containers"][0]["env"]
        assert {"name": "tunelab-data", "persistentVolumeClaim": {"claimName": "tunelab-data"}} in pod["volumes"]
        assert {"name": "tunelab-data", "mountPath": "/mnt/tunelab"} in pod["containers"][0]["volumeMounts"]
    assert {"name": "tunelab-config", "configMap": {"name": "order-extractor-config"}} in head["volumes"]


def test_cpu_job_with_object_store_storage():
    # No folder the pods share: no worker can read the adapter, so evaluating on the head must be asked for.
    cfg = config(cluster={"num_workers": 3, "eval_on": "driver"}, k8s__storage={"uri": "s3://bucket/tunelab"})
    config_map, rayjob = emit(cfg)
    jsonschema.validate(rayjob, RAY_JOB)
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 3 and group["groupName"] == "cpu-workers"
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert rayjob["spec"]["entrypoint"] == "tunelab run /etc/tunelab/config.yaml"
    shipped = validate_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert shipped.cluster.storage_path == "s3://bucket/tunelab" and not shipped.cluster.evaluates_on_worker()
    trains = emit(config(cluster={"num_workers": 3}, k8s__storage={"uri": "s3://bucket/tunelab"}, k8s__job="train"))
    assert trains[1]["spec"]["entrypoint"] == "tunelab train /etc/tunelab/config.yaml"


def test_the_job_can_train_only_or_register_what_it_evaluated():
    train_only = emit(config(k8s__job="train"))[1]["spec"]["entrypoint"]
    assert train_only == "cd /mnt/tunelab && tunelab train /etc/tunelab/config.yaml"
    config_map, rayjob = emit(config(track__register_as="order-extractor"))
    assert rayjob["spec"]["entrypoint"].endswith("tunelab run /etc/tunelab/config.yaml")
    assert validate_config(yaml.safe_load(config_map["data"]["config.yaml"])).track.register_as == "order-extractor"
    # Said where the config is read, not left to the job: the user's own eval_on stays as they set it.
    shipped = validate_config(yaml.safe_load(emit(config(cluster__eval_on="driver"))[0]["data"]["config.yaml"]))
    assert not shipped.cluster.evaluates_on_worker()


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"].update(ttlSecondsAfterFinished="1h"),
    lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
    lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParam={}),
    lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"].update(memory="lots"),
    lambda d: d["spec"].update(submissionMode="Batch"),
], ids=["ttl-type", "missing-groupName", "misspelled-field", "bad-quantity", "bad-enum"])
def test_the_rayjob_schema_refuses_what_the_api_would(mutate):
    rayjob = emit(config())[1]
    mutate(rayjob)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rayjob, RAY_JOB)


@pytest.mark.parametrize(("changes", "message"), [
    ({"k8s__image": None}, "k8s.image: set the container image"),
    ({"k8s__gpu_per_worker": 0}, "k8s.gpu_per_worker: is 0 but cluster.use_gpu is true"),
    ({"cluster__resources_per_worker": {"GPU": 4}}, "asks 4 GPUs per worker but a worker pod has k8s.gpu_per_worker=2"),
    ({"k8s__storage": {"uri": "s3://b/x"}, "track__tracking_uri": None, "k8s__job": "train"},
     "track.tracking_uri: with k8s.storage.uri"),
    # KubeRay gives each pod's Ray as many CPUs as its limit: 2 workers of 4 CPUs cannot share a 4-CPU pod.
    ({"k8s__cpu_per_worker": "4"}, "a worker pod holds 2 worker(s) asking 4 CPUs each, 8 in all, but has "
                                   "k8s.cpu_per_worker=4 (Ray sees 4); workers could never start: raise "
                                   "cpu_per_worker to 8"),
    ({"k8s__cpu_per_worker": "7"}, "8 in all, but has k8s.cpu_per_worker=7 (Ray sees 7)"),
    ({"k8s__cpu_per_worker": "lots"}, "k8s.cpu_per_worker: 'lots' is not a Kubernetes CPU quantity"),
    # A credential anywhere else would reach the job's ConfigMap as *** and fail there: refused, naming the key.
    ({"model__name": "https://mirror.example.com/m?token=abc123"}, "model.name: holds credentials, which the job's "
                                                                  "ConfigMap would show"),
    ({"k8s__job": "train", "track__register_as": "orders"}, "track.register_as: the job only trains (k8s.job: train)"),
    ({"k8s__storage": {"uri": "s3://b/x"}}, "k8s.job: run evaluates after training, and with k8s.storage.uri the pods "
                                            "share no run folder, so no GPU worker can read the adapter: the eval "
                                            "would run on the head pod (no GPU, k8s.head_cpu=2, head_memory=8Gi)"),
    # What the pods would read is validated here: a worker eval with no shared folder is refused now, not in the job.
    ({"k8s__storage": {"uri": "s3://b/x"}, "cluster__eval_on": "worker", "k8s__job": "train"},
     "cluster.eval_on: worker reads the run folder on a Ray worker, but with an object-store storage_path"),
])
def test_rayjob_refuses_combinations_that_cannot_run(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        emit(config(**changes))


def test_a_fractional_cpu_limit_counts_as_kubernetes_rounds_it():
    emit(config(k8s__cpu_per_worker="7500m"))  # Ray sees 8 CPUs: two 4-CPU workers fit


@pytest.mark.parametrize(("changes", "message"), [
    ({"cluster__use_gpu": False}, "cluster.strategy: fsdp shards the model across GPUs and needs cluster.use_gpu"),
    ({"k8s__storage": {"pvc": "data", "uri": "s3://b/x"}}, "k8s.storage: set either pvc"),
    ({"cluster__use_gpu": False, "cluster__strategy": "ddp"}, "cluster.resources_per_worker: reserves GPUs"),
    ({"k8s__tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]},
     "k8s.tolerations[0]: operator Exists matches any value"),
    ({"k8s__tolerations": [{"operator": "Equal", "value": "yes"}]},
     "k8s.tolerations[0]: a toleration without a key must use operator: Exists"),
    ({"k8s__tolerations": [{"key": "gpu", "effect": "NoSchedul"}]}, "'k8s.tolerations.effect' expects one of"),
    ({"k8s__tolerations": [{"key": "a", "operator": "Exists"}, {"key": "b", "effect": "NoSchedule",
                                                                  "toleration_seconds": 60}]},
     "k8s.tolerations[1]: toleration_seconds applies to effect NoExecute only"),
    ({"k8s__image_pull_secrets": ["Registry Creds"]}, "k8s.image_pull_secrets[0]: 'Registry Creds' is not a "
                                                     "Secret's name"),
    ({"cluster__eval_on": "worker", "cluster__storage_path": "s3://b/x"},
     "cluster.eval_on: worker reads the run folder on a Ray worker, but with an object-store storage_path"),
    ({"track__register_as": "models:/orders"}, "track.register_as: 'models:/orders' is not a model name"),
    ({"track__register_as": ""}, "track.register_as: '' is not a model name"),
    ({"k8s__job": "eval"}, "'k8s.job' expects one of"),
])
def test_config_refuses_impossible_cluster_settings(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(**changes)


def test_cli_writes_the_rayjob_and_refuses_with_one_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GPU_CONFIG))
    out = tmp_path / "rayjob.yaml"
    run = [sys.executable, "-m", "tunelab", "k8s", "rayjob", str(path)]
    done = subprocess.run([*run, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [d["kind"] for d in yaml.safe_load_all(out.read_text())] == ["ConfigMap", "RayJob"]
    refused = subprocess.run([*run, "--set", "k8s.image=null"], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines() == ["error: k8s.image: set the container image that has tunelab installed "
                                           "(e.g. registry.example.com/tunelab:0.1.0)"]


# -- KServe, from a real MLflow registry -------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    """A sqlite MLflow registry with two registered adapters trained on the shared volume, and one trained elsewhere."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, run_dir, base, template in (
            ("order-extractor", "/mnt/tunelab/runs/orders", "smollm2-135m-instruct", "chatml"),
            ("ticket-router", "/mnt/tunelab/runs/t", "smollm2-135m-instruct", "chatml"),
            ("laptop-run", "/home/me/runs/x", "smollm2-135m-instruct", "chatml"),
            ("local-base", "/mnt/tunelab/runs/l", "/models/llama", "chatml"),
            ("other-template", "/mnt/tunelab/runs/o", "smollm2-135m-instruct", "llama3")):
        client.create_registered_model(name)
        mv = client.create_model_version(name, f"s3://artifacts/{name}/adapter", tags={
            "tunelab.base_model": base, "tunelab.run_dir": run_dir, "tunelab.chat_template": template})
        client.set_registered_model_alias(name, "champion", mv.version)
    return uri


def test_inference_service_serves_registered_adapters_on_vllm(registry):
    from tunelab.cluster.k8s import adapter_reference
    from tunelab.registry import lookup_version

    versions = [lookup_version(adapter_reference(n), registry) for n in ("order-extractor", "models:/ticket-router/1")]
    # vLLM takes only 8, 16, 32, ... as --max-lora-rank: a rank-12 adapter needs 16.
    isvc = inference_service(config(), "orders", [(mv.name, mv) for mv in versions],
                             lora_ranks={"order-extractor": 12, "ticket-router": 8})
    isvc = yaml.safe_load(dump_yaml([isvc]))
    jsonschema.validate(isvc, INFERENCE_SERVICE)

    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"] == "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    args = model["args"]
    assert args[args.index("--backend") + 1] == "vllm" and "--enable-lora" in args
    # The base answers as "base" (as with `tunelab serve`), never under an adapter's name; the pod's 2 GPUs are used.
    assert args[args.index("--model_name") + 1] == "base"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    with pytest.raises(ConfigError, match="an adapter may not be served as 'base'"):
        inference_service(config(), "orders", [("base", versions[0])])
    start = args.index("--lora-modules") + 1
    assert args[start:start + 2] == ["order-extractor=/mnt/tunelab/runs/orders/adapter",
                                     "ticket-router=/mnt/tunelab/runs/t/adapter"]
    assert args[args.index("--max-lora-rank") + 1] == "16"
    with pytest.raises(ServeError, match="'ticket-router' \\(rank 600\\).*up to 512"):
        inference_service(config(), "orders", [(mv.name, mv) for mv in versions],
                          lora_ranks={"order-extractor": 12, "ticket-router": 600})
    # vLLM prompts every adapter with the template they were trained with, read from beside the adapter.
    assert args[args.index("--chat-template") + 1] == "/mnt/tunelab/runs/orders/adapter/chat_template.jinja"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "tunelab-data", "persistentVolumeClaim": {"claimName": "tunelab-data", "readOnly": True}} in (
        predictor["volumes"])
    assert predictor["serviceAccountName"] == "trainer"
    assert predictor["tolerations"] == TOLERATIONS and predictor["imagePullSecrets"] == PULL_SECRETS
    assert predictor["nodeSelector"] == {"gpu": "h100"}


def test_inference_service_refuses_adapters_it_cannot_reach(registry):
    from tunelab.errors import TunelabError
    from tunelab.registry import lookup_version

    ours, other = (lookup_version(f"models:/{n}@champion", registry) for n in ("order-extractor", "other-template"))
    with pytest.raises(ConfigError, match="different chat templates"):
        inference_service(config(), "x", [("a", ours), ("b", other)])
    laptop = lookup_version("models:/laptop-run@champion", registry)
    with pytest.raises(ConfigError, match="outside the shared volume at /mnt/tunelab"):
        inference_service(config(), "x", [("laptop-run", laptop)])
    ok = lookup_version("models:/order-extractor@champion", registry)
    with pytest.raises(ConfigError, match="k8s.storage.pvc: the adapters are served from the shared volume"):
        inference_service(config(k8s__storage={"uri": "s3://b/x"}), "x", [("order-extractor", ok)])
    with pytest.raises(ConfigError, match="--base-uri: holds credentials") as refused:
        inference_service(config(), "x", [("order-extractor", ok)], "https://bob:hunter2@models.example.com/smol")
    assert "hunter2" not in str(refused.value)
    local = lookup_version("models:/local-base@champion", registry)
    with pytest.raises(ConfigError, match="no download location known for base model '/models/llama'; pass --base-uri"):
        inference_service(config(), "x", [("local-base", local)])
    with pytest.raises(ConfigError, match="trained on different base models"):
        inference_service(config(), "x", [("local-base", local), ("order-extractor", ok)])
    with pytest.raises(TunelabError, match="no model 'nope' with alias 'champion'"):
        lookup_version("models:/nope@champion", registry)


def test_the_inference_service_schema_refuses_a_misplaced_field(registry):
    from tunelab.registry import lookup_version

    mv = lookup_version("models:/order-extractor@champion", registry)
    isvc = inference_service(config(), "orders", [(mv.name, mv)])
    isvc["spec"]["predictor"]["model"]["modelformat"] = isvc["spec"]["predictor"]["model"].pop("modelFormat")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE)


def test_cli_kserve_resolves_a_trained_registered_run(tiny_config, tmp_path):
    """End to end: a run trained on the 'shared volume' (here tmp_path), registered, then emitted by the CLI."""
    from mlflow import MlflowClient

    from tunelab import pipeline
    from tunelab.registry import register

    cfg = tiny_config.model_copy(deep=True)
    cfg.track.enabled = True
    cfg.train.max_steps = 2
    cfg.k8s.storage.pvc = "tunelab-data"
    cfg.k8s.storage.mount_path = str(tmp_path)
    cfg.k8s.gpu_per_worker = 0  # a CPU vLLM pod: no GPU requested
    pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True))
    mv, _ = register(Path(cfg.output.dir), "animals")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("animals", "champion", mv.version)

    out = tmp_path / "isvc.yaml"
    command = [sys.executable, "-m", "tunelab", "k8s", "kserve", "animals", "--tracking-uri", uri, "--out", str(out)]
    done = subprocess.run([*command, "--base-uri", "pvc://models/tiny"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [isvc] = yaml.safe_load_all(out.read_text())
    jsonschema.validate(isvc, INFERENCE_SERVICE)
    model = isvc["spec"]["predictor"]["model"]
    args = model["args"]
    assert isvc["metadata"]["name"] == "animals" and model["storageUri"] == "pvc://models/tiny"
    assert args[args.index("--lora-modules") + 1] == f"animals={Path(cfg.output.dir).resolve() / 'adapter'}"
    assert args[args.index("--max-lora-rank") + 1] == "16" and "nvidia.com/gpu" not in model["resources"]["limits"]


# -- The head's pre-flight: the KubeRay head pod has no GPU, the workers do ----------------------------------


@pytest.mark.parametrize(("gpu_only", "cpu_error"), [
    ({"train": {"liger_kernel": True}}, "train.liger_kernel: Liger kernels run on CUDA GPUs only (this run is on cpu); "
                                        "set it to false, or cluster.use_gpu: true"),
    ({"model": {"dtype": "float16"}}, "model.dtype: float16 is not supported on CPU; use bfloat16, float32 or auto, "
                                      "or cluster.use_gpu: true"),
], ids=["liger-kernel", "float16"])
def test_the_heads_preflight_checks_the_gpu_workers_device(gpu_only, cpu_error, tmp_path, tiny_model_dir):
    """`tunelab k8s rayjob` emits a job whose entrypoint runs on the head pod, which has no GPU. Its pre-flight, run
    here in a process that sees no GPU exactly as the entrypoint runs it (plus --dry-run), passes for GPU workers;
    the same config on CPU workers is refused in one line."""
    from tests.conftest import animal_rows, write_jsonl

    mount, etc = tmp_path / "mnt", tmp_path / "etc"
    (mount / "data").mkdir(parents=True)
    etc.mkdir()
    write_jsonl(mount / "data" / "train.jsonl", animal_rows(48))
    raw = copy.deepcopy(GPU_CONFIG)
    raw["model"] = {"name": str(tiny_model_dir)}
    for section, values in gpu_only.items():
        raw.setdefault(section, {}).update(values)
    cpu_workers = {"num_workers": 2, "use_gpu": False, "strategy": "ddp", "resources_per_worker": {"CPU": 4}}

    def head_preflight(cluster: dict) -> subprocess.CompletedProcess:
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump({**raw, "cluster": cluster}))
        emitted = run_tunelab("k8s", "rayjob", str(job))
        assert emitted.returncode == 0, emitted.stderr
        config_map, rayjob = yaml.safe_load_all(emitted.stdout)
        (etc / "config.yaml").write_text(config_map["data"]["config.yaml"])
        entrypoint = rayjob["spec"]["entrypoint"]
        assert entrypoint == "cd /mnt/tunelab && tunelab run /etc/tunelab/config.yaml"
        command = (entrypoint.replace("/mnt/tunelab", shlex.quote(str(mount)))
                   .replace("/etc/tunelab/config.yaml", shlex.quote(str(etc / "config.yaml")))
                   .replace("tunelab run", f"{shlex.quote(sys.executable)} -m tunelab run"))
        # The head pod: no GPU visible.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "250"}
        return subprocess.run(["bash", "-c", f"{command} --dry-run"], capture_output=True, text=True, env=env)

    on_gpu_workers = head_preflight(raw["cluster"])
    assert on_gpu_workers.returncode == 0, on_gpu_workers.stderr
    assert "ok training: 4 Ray GPU workers (fsdp) on auto" in on_gpu_workers.stdout
    assert "ok precision: chosen by each Ray GPU worker on its own GPU from model.dtype: " in on_gpu_workers.stdout
    assert ("ok eval after training (tunelab run): a Ray worker ({'CPU': 4.0, 'GPU': 1.0}; cluster.eval_on: "
            "worker; waits up to 900 s for one to be free)") in on_gpu_workers.stdout
    assert not (mount / "runs").exists()  # a dry run writes nothing

    on_cpu_workers = head_preflight(cpu_workers)
    assert on_cpu_workers.returncode == 2 and "Traceback" not in on_cpu_workers.stderr
    assert on_cpu_workers.stderr.splitlines() == [f"error: {cpu_error}"]
