"""Continuous batching: requests join a batch that is already decoding and leave it the step they finish, each
row's answer stays the one it gets alone (bit for bit), and free slots go fairly to the clients that wait."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai

from tests.serve.conftest import API_KEY

PROMPTS = ["hi", "What is two plus two?", "Extract the animal: on day 3 I saw a fox near the river.",
           "Summarize: the meeting moved to Tuesday because the room was double-booked, and the new room is smaller, "
           "so only the team leads should come; everyone else joins by video from their desks.",
           "Name three colours.", "Write one sentence about the sea, the wind and the boats in the harbour at night."]


def metric(url: str, name: str, key: str = API_KEY) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")
               or line.startswith(f"{name}{{"))


def ask(c: openai.OpenAI, job: tuple[str, str, int, bool]) -> tuple[str, str]:
    model, prompt, max_tokens, stream = job
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        reply = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    text, finish = "", None
    for chunk in c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_staggered_arrivals_of_mixed_lengths_and_adapters_answer_as_alone(server: str) -> None:
    """Against the real server process: 36 requests (3 models, 6 prompt lengths, 4 answer lengths, some streamed)
    arrive one by one while others decode; every answer equals the same request sent alone."""
    c = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    jobs = [(["base", "alpha", "beta"][i % 3], PROMPTS[i % len(PROMPTS)], [3, 9, 17, 30][i % 4], i % 5 == 0)
            for i in range(36)]
    alone = {job: ask(c, job) for job in dict.fromkeys(jobs)}  # one at a time
    joined = metric(server, "tunelab_joined_running_total")
    delays = random.Random(0).choices([0.0, 0.01, 0.03, 0.08], k=len(jobs))

    def arrive(i: int) -> tuple[str, str]:
        time.sleep(sum(delays[:i + 1]))  # staggered: each request after the one before
        return ask(c, jobs[i])

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(arrive, range(len(jobs))))
    assert together == [alone[job] for job in jobs]
    assert len({text for text, _ in together}) > 10  # the answers differ from each other: the check has teeth
    assert metric(server, "tunelab_joined_running_total") - joined >= 5  # requests joined batches mid-decode


def test_every_logit_of_a_row_is_bit_identical_to_the_row_alone(live_server) -> None:
    """In-process, so that the logits themselves can be compared: rows of two adapters, of prompts and answers of
    different lengths, join and leave around each other; each row's logits at every step equal those it gets
    alone, to the last bit (float32 on CPU: no tolerance)."""
    from tunelab.serve.engine import GenRequest

    url, engine = live_server(max_batch=8)
    engine.stop_ids = set()  # answers run to max_tokens: rows leave at known steps
    logits_of: dict[int, list] = defaultdict(list)
    choose, advance = engine._choose, engine._advance

    def recording_choose(logits, r, generator):
        logits_of[r.id].append(logits.clone())
        return choose(logits, r, generator)

    def slow_advance(r, token):  # a few ms a token, so that arrivals land while others decode
        time.sleep(0.003)
        advance(r, token)

    engine._choose, engine._advance = recording_choose, slow_advance
    rng = random.Random(1)
    jobs = [(["base", "alpha"][i % 2], [rng.randrange(5, 60) for _ in range(rng.randrange(2, 40))], rng.randrange(2, 25))
            for i in range(14)]

    def submit(job) -> tuple[GenRequest, threading.Event]:
        done = threading.Event()
        request = GenRequest(model=job[0], prompt_ids=job[1], max_tokens=job[2],
                             emit=lambda kind, _: done.set() if kind in ("done", "error") else None)
        engine.submit(request)
        return request, done

    alone = []
    for job in jobs:
        request, done = submit(job)
        assert done.wait(60) and request.finish_reason == "length"
        alone.append(logits_of[request.id])
    joined = metric(url, "tunelab_joined_running_total", "none")
    together = []
    for job in jobs:
        together.append(submit(job))
        time.sleep(rng.choice([0.0, 0.01, 0.03]))
    for request, done in together:
        assert done.wait(60) and request.finish_reason == "length"
    assert metric(url, "tunelab_joined_running_total", "none") > joined
    for (request, _), steps in zip(together, alone):
        mine = logits_of[request.id]
        assert len(mine) == len(steps)
        assert all(a.equal(b) for a, b in zip(mine, steps)), f"request {request.id} differs from alone"


def test_a_short_request_does_not_wait_for_a_long_answer(live_server) -> None:
    url, engine = live_server(max_tokens_limit=400, request_timeout=60)
    engine.stop_ids = set()
    advance = engine._advance

    def slow_advance(r, token):  # ~10 ms a token: the long answer takes ~3 s
        time.sleep(0.01)
        r.stop_ids = frozenset()
        advance(r, token)

    engine._advance = slow_advance
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    finished: dict[str, float] = {}

    def complete(name: str, max_tokens: int) -> None:
        c.completions.create(model="base", prompt="Hello there", max_tokens=max_tokens, temperature=0)
        finished[name] = time.monotonic()

    long = threading.Thread(target=complete, args=("long", 300))
    long.start()
    while metric(url, "tunelab_generated_tokens_total", "none") < 20:  # the long answer is decoding
        time.sleep(0.05)
    started = time.monotonic()
    complete("short", 3)
    assert "long" not in finished  # it joined the running batch and left before the long answer ended
    assert finished["short"] - started < 2.0
    long.join(60)
    assert finished["long"] > finished["short"]


def test_free_slots_go_to_the_client_holding_fewer(live_server) -> None:
    """Client a queues six requests, then client b two; with two slots, b is admitted as soon as a slot frees
    (before a's third request), instead of after all of a's (first come, first served)."""
    from tunelab.serve.engine import GenRequest

    url, engine = live_server(max_batch=2)
    engine.stop_ids = set()
    order: list[str] = []

    def job(client: str, name: str) -> GenRequest:
        return GenRequest(model="base", prompt_ids=[5, 6, 7], max_tokens=6, client=client,
                          emit=lambda kind, _: order.append(name) if kind == "done" else None)

    with engine.lock:  # the worker takes a0 and a1 and waits for the lock; everything else queues
        for i in range(6):
            engine.submit(job("a", f"a{i}"))
        time.sleep(0.3)
        for i in range(2):
            engine.submit(job("b", f"b{i}"))
    deadline = time.monotonic() + 60
    while len(order) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(order) == ["a0", "a1", "a2", "a3", "a4", "a5", "b0", "b1"]
    assert order.index("b0") < order.index("a3") and order.index("b1") < order.index("a4"), order


def test_the_user_field_names_the_client(live_server) -> None:
    """Two end users behind one peer address share slots fairly: `user` reaches the engine with the peer."""
    url, engine = live_server()
    seen: list[str] = []
    submit = engine.submit

    def recording_submit(request):
        seen.append(request.client)
        submit(request)

    engine.submit = recording_submit
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    for user in ("alice", None):
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  **({"user": user} if user else {}))
    assert seen == [("127.0.0.1", "alice"), ("127.0.0.1", "")]
