"""Fixtures for serving: LoRA run folders on the tiny model, and a real server process on 127.0.0.1."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import animal_rows, write_jsonl

API_KEY = "test-secret-key"
ADMIN_KEY = "test-admin-key"


def make_lora_run(root: Path, base_dir: Path, seed: int, *, dora: bool = False, system_prompt: str | None = None,
                  scale: float = 1.0) -> Path:
    """A run folder whose adapter has random non-zero weights (so each adapter answers differently); `scale`
    shrinks the LoRA B matrices (a real model stays fluent under a small random update)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.config_file import dump_config, validate_config
    from tunelab.models import load_tokenizer

    root.mkdir(parents=True)
    train = write_jsonl(root / "train.jsonl", animal_rows(16))
    cfg = validate_config({
        "model": {"name": str(base_dir), "dtype": "float32"},
        "data": {"train": str(train), "system_prompt": system_prompt},
        "method": {"type": "lora", "r": 8, "use_dora": dora},
        "track": {"enabled": False}, "output": {"dir": str(root)},
    })
    (root / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, use_dora=dora, task_type="CAUSAL_LM"))
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(root / "adapter")
    tokenizer = load_tokenizer(base_dir)
    tokenizer.save_pretrained(root / "adapter")
    (root / "chat_template.jinja").write_text(tokenizer.chat_template)
    return root


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {
        "alpha": make_lora_run(root / "alpha", tiny_model_dir, 1),
        "beta": make_lora_run(root / "beta", tiny_model_dir, 2, system_prompt="Answer in one word."),
        "gamma": make_lora_run(root / "gamma", tiny_model_dir, 3),  # loaded later through the admin endpoint
    }


_PORTS = itertools.count()


def free_port() -> int:
    """A free port from this test worker's own range, below the kernel's ephemeral ports (32768 and up).

    A port the kernel hands out (bind to 0, then close) can be handed to another xdist worker too before the
    first one's server binds it: a server in one worker then answered another worker's requests (its health
    check passed on the wrong server), and that worker's own server could not start."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    for _ in range(PORTS_PER_WORKER):
        port = 20000 + (worker % 6) * PORTS_PER_WORKER + next(_PORTS) % PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT from an earlier test: the next one
                continue
            return port
    raise RuntimeError("no free port in this worker's range")


PORTS_PER_WORKER = 2000


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


class ServerURL(str):
    """The server's base URL, carrying its process id (for memory checks)."""

    pid: int = 0


@pytest.fixture(scope="session")
def server(lora_runs: dict[str, Path]):
    """`tunelab serve alpha=... beta=...` as a real process, with an API key and an admin key."""
    port = free_port()
    env = {**os.environ, "TUNELAB_API_KEY": API_KEY, "TUNELAB_ADMIN_KEY": ADMIN_KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", f"alpha={lora_runs['alpha']}", f"beta={lora_runs['beta']}",
         "--port", str(port), "--max-batch", "16", "--max-queue", "128", "--allow-root",
         str(lora_runs["gamma"].parent)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = process.pid
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def live_server(lora_runs: dict[str, Path]):
    """A server in this process (uvicorn in a thread) so the test can reach its engine."""
    import uvicorn

    from tunelab.serve.server import ServeOptions, build_server

    def start(adapters: tuple[str, ...] = ("alpha",), **overrides):
        options = ServeOptions(adapters=[f"{name}={lora_runs[name]}" for name in adapters], port=free_port(), **overrides)
        app, engine = build_server(options)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=options.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        started.append((server, thread, engine))
        return f"http://127.0.0.1:{options.port}", engine

    started: list = []
    yield start
    for server, thread, engine in started:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()
