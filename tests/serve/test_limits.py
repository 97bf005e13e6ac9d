"""Back-pressure, timeouts and start-up refusals. The 429 and timeout cases hold the engine's lock from the
test (as a long batch would), so the queue fills deterministically; the server is still real HTTP."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.cli_process import run_tunelab
from tests.serve.conftest import make_lora_run


def ask(url: str, max_tokens: int = 4) -> str:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    return c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=max_tokens).choices[0].message.content


def test_full_queue_answers_429_and_then_recovers(live_server) -> None:
    url, engine = live_server(max_queue=2, max_batch=1)
    with ThreadPoolExecutor(max_workers=6) as pool:
        with engine.lock:  # the engine is busy: one request gets picked up and blocks, two wait, the rest bounce
            futures = [pool.submit(ask, url) for _ in range(6)]
            time.sleep(1.5)
            done = [f for f in futures if f.done()]
        assert len(done) == 3
        assert all(isinstance(f.exception(), openai.RateLimitError) for f in done)
        waiting = [f for f in futures if f not in done]
        assert all(isinstance(f.result(timeout=60), str) for f in waiting)
    assert isinstance(ask(url), str)  # capacity is back


def test_a_flood_from_one_client_cannot_keep_another_out_of_the_waiting_room(live_server) -> None:
    url, engine = live_server(max_queue=4, max_batch=1)

    def ask_as(user: str) -> str:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        return c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         user=user).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        with engine.lock:  # busy: one flood request is picked up, four wait, the sixth bounces
            flood = [pool.submit(ask_as, "flood") for _ in range(6)]
            time.sleep(1.5)
            alice = pool.submit(ask_as, "alice")  # the room is full, all of it flood's: alice pushes one out
            time.sleep(1.0)
        assert isinstance(alice.result(timeout=60), str)
        errors = [f.exception(timeout=60) for f in flood]
    assert sum(isinstance(e, openai.RateLimitError) for e in errors) == 2 and errors.count(None) == 4
    assert 'tunelab_rejected_total{reason="fair_share"} 1' in httpx.get(f"{url}/metrics").text


def test_the_waiting_room_pushes_out_only_for_a_fairer_claim() -> None:
    import queue
    from collections import Counter
    from types import SimpleNamespace

    from tunelab.serve.waiting import WaitingRoom

    room, ids = WaitingRoom(4), iter(range(100))

    def put(client: str):
        return room.put_nowait(SimpleNamespace(client=client, id=next(ids)))

    assert [put("a") for _ in range(4)] == [None] * 4
    with pytest.raises(queue.Full):
        put("a")  # alone, a client may fill the room, and no more
    assert put("b").id == 3  # a's newest goes: a 3, b 1
    assert put("b").id == 2  # a 2, b 2
    with pytest.raises(queue.Full):
        put("b")  # b holds as many as a: no fairer claim
    assert put("c").id == 1  # the first of the heaviest (a and b hold two each) gives its newest up
    assert sorted((r.client, r.id) for r in room.take(4, Counter())) == [("a", 0), ("b", 5), ("b", 6), ("c", 8)]


def test_invented_user_ids_get_one_peers_share() -> None:
    """`user` is whatever the caller writes: a flood from one address under many user ids is still one peer's
    share, in the waiting room and for free slots; the users behind one address share that address's places."""
    import queue
    from collections import Counter
    from types import SimpleNamespace

    from tunelab.serve.waiting import WaitingRoom

    room, ids = WaitingRoom(4), iter(range(100))

    def put(peer: str, user: str):
        return room.put_nowait(SimpleNamespace(client=(peer, user), id=next(ids)))

    assert [put("10.0.0.66", f"user-{i}") for i in range(4)] == [None] * 4
    with pytest.raises(queue.Full):
        put("10.0.0.66", "user-99")  # a new id from the same address is no fairer claim
    assert put("10.0.0.7", "alice").client == ("10.0.0.66", "user-0")  # another address pushes one out
    assert put("10.0.0.8", "bob").client == ("10.0.0.66", "user-1")
    with pytest.raises(queue.Full):
        put("10.0.0.8", "carol")  # 10.0.0.8 already holds as many places as 10.0.0.66 will
    # Free slots: the address holding fewer first, whatever user ids the other one used.
    holding = Counter({("10.0.0.66", "user-5"): 1, ("10.0.0.66", "user-6"): 1})
    assert [r.client for r in room.take(2, holding)] == [("10.0.0.7", "alice"), ("10.0.0.8", "bob")]
    # Behind one address (a gateway), a user holding fewer places pushes out the newest of the one holding most.
    room = WaitingRoom(3)
    assert [put("gw", "flood") for _ in range(3)] == [None] * 3
    assert put("gw", "dave").client == ("gw", "flood")
    with pytest.raises(queue.Full):
        put("gw", "dave")  # flood 2, dave 1: dave would hold as many as flood


def test_request_that_waits_past_its_timeout_gets_504(live_server) -> None:
    url, engine = live_server(request_timeout=1.0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with engine.lock:
            future = pool.submit(ask, url)
            time.sleep(1.5)
        with pytest.raises(openai.APIStatusError) as info:
            future.result(timeout=60)
    assert info.value.status_code == 504 and "timed out" in str(info.value)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_tunelab(*args, timeout=120, env={**os.environ, **(env or {})})


def test_binding_beyond_loopback_needs_an_api_key(lora_runs: dict[str, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_API_KEY"}
    result = run_tunelab("serve", str(lora_runs["alpha"]), "--host", "0.0.0.0", timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 reaches beyond this machine: set an API key in $TUNELAB_API_KEY "
        "(clients send it as 'Authorization: Bearer KEY')"]


def test_dora_and_wrong_base_adapters_are_refused(tmp_path: Path, tiny_model_dir: Path, lora_runs: dict[str, Path]) -> None:
    from tests.conftest import build_tiny_llama

    dora = make_lora_run(tmp_path / "dora", tiny_model_dir, 4, dora=True)
    result = run_cli("serve", str(dora), "--engine", "vllm")
    assert result.returncode == 2 and "a DoRA adapter; PEFT cannot batch DoRA" in result.stderr
    other_base = build_tiny_llama(tmp_path / "other-base", seed=9)
    result = run_cli("serve", str(lora_runs["alpha"]), "--base", str(other_base), "--engine", "vllm")
    assert result.returncode == 2 and "but this server's base is" in result.stderr
    result = run_cli("serve", f"x={lora_runs['alpha']}", f"x={lora_runs['beta']}", "--engine", "vllm")
    assert result.returncode == 2 and "two adapters are named 'x'" in result.stderr
    result = run_cli("serve", str(tmp_path / "missing"), "--engine", "vllm")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    result = run_cli("serve", str(lora_runs["alpha"]), "--batching", "sometimes")
    assert result.returncode == 2 and result.stderr.strip() == "error: --batching sometimes: choose continuous or static"


def test_vllm_command_names_every_adapter(lora_runs: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run_cli("serve", f"alpha={lora_runs['alpha']}", f"beta={lora_runs['beta']}", "--engine", "vllm",
                     "--port", "9000", env={"TUNELAB_API_KEY": "k"})
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    # The key is never printed, and never an argument (a process list shows those): vLLM reads VLLM_API_KEY.
    assert words[:4] == ['VLLM_API_KEY="$TUNELAB_API_KEY"', "vllm", "serve", str(tiny_model_dir.resolve())]
    assert "--api-key" not in words
    assert "--enable-lora" in words and words[words.index("--max-lora-rank") + 1] == "8"
    i = words.index("--lora-modules")
    assert words[i + 1:i + 3] == [f"alpha={lora_runs['alpha'] / 'adapter'}", f"beta={lora_runs['beta'] / 'adapter'}"]
    assert words[words.index("--chat-template") + 1] == str(lora_runs["alpha"] / "chat_template.jinja")
    assert "system prompt" in result.stderr  # beta's system prompt is something vLLM will not add
    launch = run_cli("serve", str(lora_runs["alpha"]), "--engine", "vllm", "--launch", env={"PATH": "/nonexistent"})
    assert launch.returncode == 2 and "no `vllm` on PATH" in launch.stderr
    # --launch runs `vllm` (here a stand-in that writes down what it got): the key in its environment, not its argv.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\necho "$VLLM_API_KEY" > {tmp_path}/key\n')
    (bin_dir / "vllm").chmod(0o755)
    launch = run_cli("serve", str(lora_runs["alpha"]), "--engine", "vllm", "--launch",
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "TUNELAB_API_KEY": "k3yv4lue-secret"})
    assert launch.returncode == 0, launch.stderr
    argv = (tmp_path / "argv").read_text()
    assert argv.startswith("serve ") and "k3yv4lue" not in argv and "--api-key" not in argv
    assert (tmp_path / "key").read_text().strip() == "k3yv4lue-secret"
