"""Scale out: the train stage on a Ray cluster (ray_runner), and Kubernetes manifests for KubeRay and KServe (k8s)."""
