"""Peak memory and throughput numbers reported by train, eval and the benchmarks."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_memory_mb(device: str) -> float:
    """Peak memory that matters on `device`: max allocated on CUDA, process RSS on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / (1024 * 1024)
    return peak_rss_mb()
