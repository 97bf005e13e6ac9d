"""Counters, gauges and histograms for `/metrics`, in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import defaultdict

HELP = {
    "tunelab_requests_total": ("counter", "Completed HTTP requests by endpoint, model and status code."),
    "tunelab_rejected_total": ("counter", "Requests refused before generation (queue full, timeout)."),
    "tunelab_joined_running_total": ("counter", "Requests admitted into a batch that was already decoding."),
    "tunelab_cancelled_total": ("counter", "Requests abandoned by their client before the answer was complete."),
    "tunelab_generated_tokens_total": ("counter", "Tokens generated, by model."),
    "tunelab_prompt_tokens_total": ("counter", "Prompt tokens processed, by model."),
    "tunelab_queue_depth": ("gauge", "Requests waiting for the engine."),
    "tunelab_adapters_loaded": ("gauge", "LoRA adapters in memory."),
    "tunelab_running_rows": ("gauge", "Requests in the running batch (continuous batching)."),
    "tunelab_request_seconds": ("histogram", "Time from request to last token."),
    "tunelab_batch_size": ("histogram", "Requests decoded together (per step if continuous, per batch if static)."),
    "tunelab_batch_seconds": ("histogram", "Wall time of one decode step (continuous) or one whole batch (static)."),
}
BUCKETS = {
    "tunelab_request_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    "tunelab_batch_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    "tunelab_batch_size": (1, 2, 4, 8, 16, 32, 64),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, float]] = defaultdict(dict)
        self._histograms: dict[str, tuple[list[int], list[float]]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name][""] = float(value)

    def observe(self, name: str, value: float) -> None:
        buckets = BUCKETS[name]
        with self._lock:
            counts, total = self._histograms.setdefault(name, ([0] * (len(buckets) + 1), [0.0]))
            for i, bound in enumerate(buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-1] += 1  # +Inf
            total[0] += value

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    counts, total = self._histograms.get(name, ([0] * (len(BUCKETS[name]) + 1), [0.0]))
                    for bound, count in zip([*BUCKETS[name], "+Inf"], counts):
                        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
                    lines += [f"{name}_sum {total[0]}", f"{name}_count {counts[-1]}"]
                else:
                    for key, value in sorted(self._values.get(name, {"": 0.0}).items()):
                        lines.append(f"{name}{key} {value:g}")
        return "\n".join(lines) + "\n"
