"""Keep a long-running server's resident memory flat under glibc.

Python frees request buffers (a 4 MB body, a million-character prompt tokenized in a worker thread) back to
malloc, but glibc keeps freed pages in each thread's arena and rarely returns them: RSS climbs to the worst
moment seen and stays there. Two standard remedies, both no-ops off glibc: fewer arenas (threads share two
instead of up to 8 per core), and `malloc_trim(0)` every few seconds, which hands free pages back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def keep_memory_flat(interval_s: float = 10.0, arenas: int = 2) -> threading.Event | None:
    """Limit malloc arenas and start a daemon thread that trims free memory every `interval_s`; returns the event
    that stops it, or None where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return None
    libc.mallopt(M_ARENA_MAX, arenas)
    stop = threading.Event()

    def trim() -> None:
        while not stop.wait(interval_s):
            libc.malloc_trim(0)

    threading.Thread(target=trim, name="tunelab-malloc-trim", daemon=True).start()
    return stop
