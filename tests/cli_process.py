"""`python -m tunelab ...` as the tests run it, without importing torch, transformers and MLflow each time.

About a hundred tests run the CLI as a user would, in its own process, and check its exit status and output. Each
such process spent ~5 s of CPU importing torch and transformers, and ~5 s more importing MLflow (tracking is on by
default), before doing a second of work. So each test worker keeps one small server process that has imported those
libraries (and nothing else: no torch op has run, so no thread pool exists to break across fork) and forks it for
each command. The child is a process of its own: it takes the command's environment, working directory and umask,
writes to its own stdout/stderr files, runs tunelab as `python -m tunelab` does (`runpy`, tunelab imported fresh: it
reads COLUMNS, TUNELAB_* and the rest when a real process would) and exits as the interpreter would (non-daemon
threads joined, atexit handlers run, streams flushed) without tearing down torch's modules.

Where that could differ from a fresh process, a fresh process runs instead: when the command's environment differs
from the server's in a variable those libraries or the interpreter read at start-up (the list below), or when a test
asks for one (`fresh=True`: warnings printed at import time show only there).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# What the preloaded libraries (torch, transformers, huggingface_hub, tokenizers) or the interpreter itself read at
# start-up: a command whose environment differs from the server's in one of these gets a fresh process.
_READ_AT_START = ("HF_", "HUGGINGFACE", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "KMP_", "GOMP_", "CUDA_",
                  "NVIDIA_", "TOKENIZERS_", "SAFETENSORS_", "ACCELERATE_", "USE_", "XDG_", "HOME", "TMP", "TEMP",
                  "LANG", "LC_", "LD_", "PYTHON", "MLFLOW_", "ARROW_", "JE_")

# ... except these: output buffering (a command's output is read once it has exited, streams flushed), and
# PYTHONBREAKPOINT, read at each breakpoint() call (Ray sets it in a process that starts a cluster, a test's too).
_READ_LATER = ("PYTHONUNBUFFERED", "PYTHONBREAKPOINT")

_SERVER = r"""
import atexit, gc, json, os, runpy, sys, threading
import torch, transformers  # noqa: F401  the expensive imports, done once
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy modules resolved)
import mlflow, mlflow.store.tracking.sqlalchemy_store  # noqa: F401  tracking is on by default: 5 s more a command

replies = os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        replies.close()
        os.dup2(devnull, 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY), 2)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = open(os.devnull)
        sys.argv = ["tunelab", *request["args"]]
        code = 0
        try:
            runpy.run_module("tunelab", run_name="__main__", alter_sys=True)
        except SystemExit as stop:  # as the interpreter reads it
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # The interpreter's shutdown, less tearing down torch's modules (0.9 s a command): wait for non-daemon
        # threads, run atexit handlers (weakref.finalize's included), collect garbage, flush the streams.
        threading._shutdown()
        atexit._run_exitfuncs()
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    replies.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
"""

_server: subprocess.Popen | None = None
_one_at_a_time = threading.Lock()
_server_env: dict[str, str] = {}


def _alive() -> bool:
    return _server is not None and _server.poll() is None


def _start() -> subprocess.Popen:
    global _server, _server_env
    if not _alive():
        _server_env = dict(os.environ)
        # Unbuffered: select() on the pipe then tells whether the next line is there (nothing read ahead of it).
        # pyarrow (imported by MLflow) starts jemalloc's background thread at load unless told not to: a process
        # forked from one with a second thread running may inherit a lock that thread held.
        _server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   bufsize=0, env={**_server_env, "JE_ARROW_MALLOC_CONF": "background_thread:false"})
        atexit.register(_server.kill)
    return _server


def _forkable(env: dict[str, str]) -> bool:
    start = _server_env if _alive() else dict(os.environ)
    differ = {k for k in env.keys() | start.keys() if env.get(k) != start.get(k)}
    return not any(k.startswith(_READ_AT_START) and k not in _READ_LATER for k in differ)


def run_tunelab(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                timeout: float | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Like subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, ...)."""
    env = dict(os.environ if env is None else env)
    cwd = str(cwd or os.getcwd())
    # One command at a time goes through the server; one started while another runs (from another thread) gets a
    # process of its own, so commands that must run side by side still do.
    if fresh or not _forkable(env) or not _one_at_a_time.acquire(blocking=False):
        return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=timeout)
    try:
        return _forked(args, cwd, env, timeout)
    finally:
        _one_at_a_time.release()


def _forked(args: tuple[str, ...], cwd: str, env: dict[str, str], timeout: float | None) -> subprocess.CompletedProcess:
    server = _start()
    with tempfile.TemporaryDirectory(prefix="tunelab-cli-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        out.touch(), err.touch()
        umask = os.umask(0o022)
        os.umask(umask)
        request = {"args": list(args), "cwd": cwd, "env": env, "umask": umask, "stdout": str(out), "stderr": str(err)}
        server.stdin.write((json.dumps(request) + "\n").encode())
        pid = json.loads(server.stdout.readline())["pid"]
        try:
            status = _read_status(server, timeout)
        except subprocess.TimeoutExpired:
            os.kill(pid, 9)
            _read_status(server, None)
            raise subprocess.TimeoutExpired([sys.executable, "-m", "tunelab", *args], timeout,
                                            out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess([sys.executable, "-m", "tunelab", *args], status, out.read_text(),
                                           err.read_text())


def _read_status(server: subprocess.Popen, timeout: float | None) -> int:
    import select

    if timeout is not None and not select.select([server.stdout], [], [], timeout)[0]:
        raise subprocess.TimeoutExpired("tunelab", timeout)
    return json.loads(server.stdout.readline())["status"]
