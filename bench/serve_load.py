"""Staggered load for bench/serve_throughput.py: N clients, each sending its requests one after another with
exponential (Poisson) gaps, streaming, against any OpenAI-compatible server. Time to first token is the first
chunk that carries answer text; completion tokens are counted by re-tokenizing the answers with the base model's
tokenizer (the same count whatever server answered)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import openai

PROMPTS = [
    "Extract the order: Hi, I'd like 3 bags of coffee delivered to Halifax by Friday.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me two tips for learning to cook.",
    "Summarize: The meeting moved to Tuesday because the room was double-booked, and the new room is smaller, so "
    "only the team leads should come while everyone else joins by video.",
    "Name three colours of the rainbow.",
    "Explain what a verb is in one sentence.",
    "Translate 'good morning' into French.",
]


@dataclass(frozen=True)
class Job:
    client: int
    model: str
    prompt: str
    max_tokens: int
    gap: float  # seconds the client waits before sending it (after its previous answer)


def workload(models: list[str], clients: int, requests: int, mean_gap: float, max_tokens: tuple[int, int],
             seed: int) -> list[Job]:
    """`requests` jobs spread round-robin over `clients`, mixed models and prompts, answer limits drawn from
    `max_tokens`, exponential gaps of mean `mean_gap`: the same list for every server measured."""
    rng = random.Random(seed)
    return [Job(i % clients, models[rng.randrange(len(models))], PROMPTS[rng.randrange(len(PROMPTS))],
                rng.randint(*max_tokens), rng.expovariate(1 / mean_gap)) for i in range(requests)]


@dataclass
class Outcome:
    job: Job
    sent: float
    first: float | None
    done: float
    text: str
    error: str | None = None


def run_load(base_url: str, jobs: list[Job], timeout: float = 600) -> tuple[list[Outcome], float]:
    """Send `jobs` (each client's in order, clients in parallel); (outcomes in job order, wall seconds)."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)
    outcomes: list[Outcome | None] = [None] * len(jobs)
    started = time.perf_counter()

    def one_client(index: int) -> None:
        for i, job in enumerate(jobs):
            if job.client != index:
                continue
            time.sleep(job.gap)
            sent, first, text, error = time.perf_counter(), None, "", None
            try:
                stream = client.chat.completions.create(
                    model=job.model, messages=[{"role": "user", "content": job.prompt}], max_tokens=job.max_tokens,
                    temperature=0, stream=True)
                for chunk in stream:
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                    if delta:
                        first = first or time.perf_counter()
                        text += delta
            except openai.APIError as err:
                error = f"{type(err).__name__}: {err}"
            outcomes[i] = Outcome(job, sent - started, None if first is None else first - started,
                                  time.perf_counter() - started, text, error)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in sorted({j.client for j in jobs})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in outcomes if o is not None], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(outcomes: list[Outcome], seconds: float, tokenizer) -> dict:
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(len(tokenizer(o.text, add_special_tokens=False)["input_ids"]) for o in ok)
    ttft = [o.first - o.sent for o in ok if o.first is not None]
    latency = [o.done - o.sent for o in ok]
    return {"requests": len(outcomes), "errors": len(outcomes) - len(ok), "completion_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "latency_p50_s": round(percentile(latency, 50), 3), "latency_p99_s": round(percentile(latency, 99), 3)}
