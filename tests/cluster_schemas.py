"""JSON Schemas for the parts of the Kubernetes APIs that `tunelab k8s` emits, written from the published
definitions:

- KubeRay ray.io/v1 (ray-project/kuberay, ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go,
  which generate config/crd/bases/ray.io_rayjobs.yaml): RayJobSpec, RayClusterSpec, HeadGroupSpec,
  WorkerGroupSpec. Required fields are the Go fields whose json tag has no omitempty and no +optional marker
  (headGroupSpec; template and rayStartParams; groupName, minReplicas, maxReplicas).
- KServe serving.kserve.io/v1beta1 (kserve/kserve, pkg/apis/serving/v1beta1/predictor.go, predictor_model.go,
  component.go): PredictorSpec = the framework specs + model (ModelSpec: modelFormat{name, version}, runtime,
  and PredictorExtensionSpec: storageUri, runtimeVersion, protocolVersion, storage, plus the inline container)
  + the inline PodSpec + ComponentExtensionSpec (minReplicas, maxReplicas, scaleTarget, scaleMetric, ...).
- core/v1 PodTemplateSpec, Container, EnvVar, VolumeMount, Volume, ResourceRequirements and ConfigMap, as the
  CRDs embed them (resource quantities are int-or-string with Kubernetes' quantity pattern).

Stricter than the API server in one way on purpose: `additionalProperties: false` wherever the emitted
objects live, so a misspelled field fails here instead of being pruned silently by the server. Lists of
fields name every field of the Go type, not only the ones tunelab uses, so a valid field is never refused.
"""

from __future__ import annotations

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
INT64 = {"type": "integer"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The pattern controller-gen writes for resource.Quantity (x-kubernetes-int-or-string).
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern":
            r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}
DNS_SUBDOMAIN = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
DNS_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
ANY_OBJECT = {"type": "object"}


def _strict(properties: dict, required: list[str] | None = None) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


OBJECT_META = _strict({
    "name": DNS_LABEL, "namespace": DNS_LABEL, "labels": STRING_MAP, "annotations": STRING_MAP,
    "generateName": {"type": "string"},
})

ENV_VAR = _strict({"name": {"type": "string", "minLength": 1}, "value": {"type": "string"}, "valueFrom": ANY_OBJECT},
                  ["name"])
VOLUME_MOUNT = _strict({
    "name": {"type": "string"}, "mountPath": {"type": "string", "pattern": "^/"}, "readOnly": {"type": "boolean"},
    "subPath": {"type": "string"}, "subPathExpr": {"type": "string"}, "mountPropagation": {"type": "string"},
    "recursiveReadOnly": {"type": "string"},
}, ["name", "mountPath"])
RESOURCES = _strict({
    "requests": {"type": "object", "additionalProperties": QUANTITY},
    "limits": {"type": "object", "additionalProperties": QUANTITY},
    "claims": {"type": "array"},
})
CONTAINER_PORT = _strict({"containerPort": {**INT32, "minimum": 1, "maximum": 65535}, "name": {"type": "string"},
                          "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "hostPort": INT32, "hostIP": {"type": "string"}},
                         ["containerPort"])
CONTAINER_FIELDS = {
    "name": DNS_LABEL, "image": {"type": "string", "minLength": 1},
    "command": {"type": "array", "items": {"type": "string"}}, "args": {"type": "array", "items": {"type": "string"}},
    "workingDir": {"type": "string"}, "ports": {"type": "array", "items": CONTAINER_PORT},
    "env": {"type": "array", "items": ENV_VAR}, "envFrom": {"type": "array"}, "resources": RESOURCES,
    "volumeMounts": {"type": "array", "items": VOLUME_MOUNT},
    "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
    "livenessProbe": ANY_OBJECT, "readinessProbe": ANY_OBJECT, "startupProbe": ANY_OBJECT, "lifecycle": ANY_OBJECT,
    "securityContext": ANY_OBJECT, "stdin": {"type": "boolean"}, "tty": {"type": "boolean"},
    "terminationMessagePath": {"type": "string"}, "terminationMessagePolicy": {"type": "string"},
    "volumeDevices": {"type": "array"}, "resizePolicy": {"type": "array"}, "restartPolicy": {"type": "string"},
}
CONTAINER = _strict(CONTAINER_FIELDS, ["name"])
VOLUME = {
    "type": "object", "required": ["name"],
    "properties": {
        "name": DNS_LABEL,
        "configMap": _strict({"name": {"type": "string"}, "items": {"type": "array"}, "defaultMode": INT32,
                              "optional": {"type": "boolean"}}),
        "persistentVolumeClaim": _strict({"claimName": {"type": "string", "minLength": 1}, "readOnly": {"type": "boolean"}},
                                         ["claimName"]),
        "emptyDir": ANY_OBJECT, "secret": ANY_OBJECT, "hostPath": ANY_OBJECT,
    },
    # A volume names exactly one source.
    "minProperties": 2, "maxProperties": 2,
}
TOLERATION = _strict({
    "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
    "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}, "tolerationSeconds": INT64,
})
POD_SPEC_FIELDS = {
    "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
    "initContainers": {"type": "array", "items": CONTAINER}, "volumes": {"type": "array", "items": VOLUME},
    "serviceAccountName": DNS_LABEL, "nodeSelector": STRING_MAP, "tolerations": {"type": "array", "items": TOLERATION},
    "affinity": ANY_OBJECT, "imagePullSecrets": {"type": "array", "items": _strict({"name": DNS_SUBDOMAIN}, ["name"])}, "securityContext": ANY_OBJECT,
    "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]}, "priorityClassName": {"type": "string"},
    "runtimeClassName": {"type": "string"}, "schedulerName": {"type": "string"},
    "terminationGracePeriodSeconds": INT64, "hostNetwork": {"type": "boolean"}, "shmSize": {"type": "string"},
}
POD_TEMPLATE = _strict({"metadata": OBJECT_META, "spec": _strict(POD_SPEC_FIELDS, ["containers"])})

HEAD_GROUP = _strict({
    "template": POD_TEMPLATE, "headService": ANY_OBJECT, "enableIngress": {"type": "boolean"},
    "rayStartParams": STRING_MAP, "serviceType": {"type": "string"},
}, ["template", "rayStartParams"])
WORKER_GROUP = _strict({
    "suspend": {"type": "boolean"}, "groupName": {"type": "string", "minLength": 1},
    "replicas": {**INT32, "minimum": 0}, "minReplicas": {**INT32, "minimum": 0}, "maxReplicas": {**INT32, "minimum": 0},
    "idleTimeoutSeconds": INT32, "rayStartParams": STRING_MAP, "template": POD_TEMPLATE,
    "scaleStrategy": _strict({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
    "numOfHosts": {**INT32, "minimum": 1},
}, ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"])
RAY_CLUSTER_SPEC = _strict({
    "suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "autoscalerOptions": ANY_OBJECT,
    "headServiceAnnotations": STRING_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": ANY_OBJECT, "headGroupSpec": HEAD_GROUP, "rayVersion": {"type": "string"},
    "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
}, ["headGroupSpec"])
RAY_JOB_SPEC = _strict({
    "activeDeadlineSeconds": {**INT32, "minimum": 1}, "backoffLimit": {**INT32, "minimum": 0},
    "rayClusterSpec": RAY_CLUSTER_SPEC, "submitterPodTemplate": POD_TEMPLATE, "metadata": STRING_MAP,
    "clusterSelector": STRING_MAP, "submitterConfig": _strict({"backoffLimit": INT32}),
    "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
    "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
    "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
    "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
    "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": {**INT32, "minimum": 0},
    "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
})
RAY_JOB = _strict({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": OBJECT_META,
                   "spec": RAY_JOB_SPEC}, ["apiVersion", "kind", "metadata", "spec"])

CONFIG_MAP = _strict({"apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": OBJECT_META,
                      "data": STRING_MAP, "binaryData": STRING_MAP, "immutable": {"type": "boolean"}},
                     ["apiVersion", "kind", "metadata"])

# KServe ModelSpec = modelFormat + runtime + PredictorExtensionSpec (with the container inline).
MODEL_SPEC = _strict({
    "modelFormat": _strict({"name": {"type": "string", "minLength": 1}, "version": {"type": "string"}}, ["name"]),
    "runtime": {"type": "string"}, "storageUri": {"type": "string", "minLength": 1},
    "runtimeVersion": {"type": "string"}, "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
    "storage": ANY_OBJECT, **{k: v for k, v in CONTAINER_FIELDS.items()},
}, ["modelFormat"])
COMPONENT_EXTENSION_FIELDS = {
    "minReplicas": {**INT32, "minimum": 0}, "maxReplicas": {**INT32, "minimum": 0}, "scaleTarget": INT32,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "scaleMetricType": {"enum": ["Utilization", "Value", "AverageValue"]}, "autoScaling": ANY_OBJECT,
    "containerConcurrency": INT64, "timeout": INT64, "canaryTrafficPercent": INT64, "logger": ANY_OBJECT,
    "batcher": ANY_OBJECT, "labels": STRING_MAP, "annotations": STRING_MAP, "deploymentStrategy": ANY_OBJECT,
}
FRAMEWORKS = ["sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm",
              "paddle"]
PREDICTOR = _strict({
    **{name: ANY_OBJECT for name in FRAMEWORKS}, "model": MODEL_SPEC, "workerSpec": ANY_OBJECT,
    **{k: v for k, v in POD_SPEC_FIELDS.items() if k != "containers"},
    "containers": {"type": "array", "items": CONTAINER}, **COMPONENT_EXTENSION_FIELDS,
})
INFERENCE_SERVICE = _strict({
    "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
    # KServe's own name rule (inference_service_validation.go): starts with a letter.
    "metadata": {**OBJECT_META, "properties": {**OBJECT_META["properties"], "name": {
        "type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}},
    "spec": _strict({"predictor": PREDICTOR, "transformer": ANY_OBJECT, "explainer": ANY_OBJECT}, ["predictor"]),
}, ["apiVersion", "kind", "metadata", "spec"])
