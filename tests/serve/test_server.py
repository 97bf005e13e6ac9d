"""`tunelab serve` as a real process, driven by the official openai client over HTTP on 127.0.0.1."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.serve.conftest import ADMIN_KEY, API_KEY

PROMPTS = ["Extract the animal: I saw a cat.", "Hello there, how are you?", "What is two plus two?",
           "Extract the animal: on day 3 I saw a fox."]


def client(url: str, key: str | None = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=120)


def reference_answer(run: Path | None, base_dir: Path, prompt: str, max_tokens: int, system: str | None = None) -> str:
    """Greedy answer computed in-process with PEFT, one prompt at a time: what the server must return."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.chat import render_prompt, with_system_prompt
    from tunelab.eval.generate import generate_greedy
    from tunelab.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if run is not None:
        model = PeftModel.from_pretrained(model, run / "adapter")
    tokenizer = load_tokenizer(base_dir)
    text = render_prompt(tokenizer, with_system_prompt([{"role": "user", "content": prompt}], system))
    (answer,) = generate_greedy(model, tokenizer, [text], max_tokens, 1, show_progress=False)
    return answer


def test_models_lists_base_and_adapters(server: str) -> None:
    ids = [m.id for m in client(server).models.list().data]
    assert ids[0] == "base" and {"alpha", "beta"} <= set(ids)


def test_each_model_answers_with_its_own_adapter(server: str, lora_runs: dict[str, Path], tiny_model_dir: Path) -> None:
    c = client(server)
    prompt = PROMPTS[0]
    answers = {}
    for name, run, system in [("base", None, None), ("alpha", lora_runs["alpha"], None),
                              ("beta", lora_runs["beta"], "Answer in one word.")]:
        reply = c.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=12)
        expected = reference_answer(run, tiny_model_dir, prompt, 12, system)
        assert reply.choices[0].message.content.strip() == expected, name
        assert reply.usage.completion_tokens > 0 and reply.model == name
        answers[name] = expected
    assert len(set(answers.values())) == 3  # the adapters really change the answer


def test_streaming_chat_equals_the_whole_answer(server: str) -> None:
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = c.chat.completions.create(model="alpha", messages=messages, max_tokens=16)
    chunks = list(c.chat.completions.create(model="alpha", messages=messages, max_tokens=16, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 3  # the answer arrived in pieces, not at once
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_include_usage_sends_the_counts_in_a_last_chunk(server: str) -> None:
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = c.chat.completions.create(model="alpha", messages=messages, max_tokens=16)
    chunks = list(c.chat.completions.create(model="alpha", messages=messages, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(ch.usage is None for ch in chunks[:-1])
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == whole.choices[0].message.content
    streamed = list(c.completions.create(model="beta", prompt="The quick", max_tokens=5, stream=True,
                                         stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens > 0 and streamed[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="stream_options: only allowed when stream is true"):
        c.chat.completions.create(model="alpha", messages=messages, stream_options={"include_usage": True})


def test_parameters_that_would_change_the_answer_are_refused_unless_default(server: str) -> None:
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    plain = c.chat.completions.create(model="alpha", messages=messages, max_tokens=8).choices[0].message.content
    # What clients send by default passes, and changes nothing.
    defaults = c.chat.completions.create(
        model="alpha", messages=messages, max_tokens=8, presence_penalty=0, frequency_penalty=0.0, logprobs=False,
        response_format={"type": "text"}, tool_choice="none", logit_bias={}, metadata={"k": "v"}, store=False)
    assert defaults.choices[0].message.content == plain
    refused = [{"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
               {"response_format": {"type": "json_object"}}, {"logprobs": True, "top_logprobs": 2},
               {"logit_bias": {"42": 100}}, {"presence_penalty": 1.5}, {"frequency_penalty": -0.5}]
    for extra in refused:
        with pytest.raises(openai.BadRequestError, match="not supported by this server") as err:
            c.chat.completions.create(model="alpha", messages=messages, max_tokens=8, **extra)
        assert list(extra)[0] in str(err.value)
    for extra in ({"echo": True}, {"best_of": 3}, {"suffix": "end"}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError, match=f"{list(extra)[0]}: not supported"):
            c.completions.create(model="beta", prompt="The quick", max_tokens=4, **extra)
    # The server goes on answering as before.
    assert c.chat.completions.create(model="alpha", messages=messages, max_tokens=8).choices[0].message.content == plain


def test_completions_endpoint_streaming_and_not(server: str) -> None:
    c = client(server)
    whole = c.completions.create(model="beta", prompt="The quick brown fox", max_tokens=10)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="beta", prompt="The quick brown fox", max_tokens=10, stream=True))
    assert whole.choices[0].text == streamed and whole.object == "text_completion"
    assert whole.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_and_max_tokens(server: str) -> None:
    c = client(server)
    full = c.completions.create(model="base", prompt="Hello there", max_tokens=20).choices[0].text
    assert len(full) > 2
    stop = full[1:3]
    cut = c.completions.create(model="base", prompt="Hello there", max_tokens=20, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    one = c.completions.create(model="base", prompt="Hello there", max_tokens=1)
    assert one.usage.completion_tokens <= 1


def test_missing_or_wrong_api_key_is_401(server: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # liveness needs no key


def test_unknown_model_is_404(server: str) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    # A name of a megabyte is quoted cut short (the whole name came back, a 1 MB error body)
    reply = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "n" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404 and len(reply.content) < 1000, len(reply.content)
    assert "'" + "n" * 80 + "... (1000000 characters)' does not exist" in reply.json()["error"]["message"]


def test_text_content_parts_are_the_same_prompt_and_other_parts_are_400(server: str) -> None:
    c = client(server)
    plain = c.chat.completions.create(model="alpha", max_tokens=6, temperature=0,
                                      messages=[{"role": "user", "content": "Extract the animal:\nI saw a cat."}])
    parts = c.chat.completions.create(model="alpha", max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Extract the animal:"}, {"type": "text", "text": "I saw a cat."}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="part 1 is a text part whose text is NoneType, not a string"):
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "text", "text": None}]}])  # was "... is a text part; only text"


def test_malformed_bodies_are_400(server: str) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="role"):
        c.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    hi = b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}]'
    bodies = {b"{not json": "the body is not valid JSON (Expecting property name enclosed in double quotes at "
                            "character 1)",
              b"[" * 100_000 + b"]" * 100_000: "could not be parsed as JSON (not UTF-8, or nested too deeply)",
              hi + b', "temperature": NaN}': "temperature: Input should be a finite number",
              hi + b', "top_p": Infinity}': "top_p: Input should be a finite number",
              # OpenAI's API refuses these; read leniently, "yes" turned streaming on
              hi + b', "stream": "yes"}': "stream: Input should be a valid boolean",
              hi + b', "max_tokens": "4"}': "max_tokens: Input should be a valid integer",
              hi + b', "max_tokens": 3.0}': "max_tokens: Input should be a valid integer",
              hi + b', "temperature": "0.5"}': "temperature: Input should be a valid number"}
    for body, message in bodies.items():
        raw = httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers)
        assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_request", raw.text
        assert message in raw.json()["error"]["message"]
    # The same body, well formed, is answered (a short answer, and time for it on a busy CPU: httpx waits 5 s).
    ok = httpx.post(f"{server}/v1/chat/completions", content=hi + b', "max_tokens": 4}', headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_64_concurrent_mixed_adapter_requests_equal_sequential(live_server, monkeypatch, batching: str) -> None:
    from tunelab.serve import continuous, static_batch

    url, engine = live_server(adapters=("alpha", "beta"), max_batch=16, max_queue=128, batching=batching)
    c = client(url, key=None)
    jobs = [(["base", "alpha", "beta"][i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(64)]

    def ask(job: tuple[str, str]) -> str:
        model, prompt = job
        reply = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12)
        return reply.choices[0].message.content

    sequential = {job: ask(job) for job in dict.fromkeys(jobs)}  # one at a time: 12 distinct requests
    batches: list[list[str]] = []  # the model of each row, per decoded batch (static) or decode step (continuous)
    if batching == "static":
        decode = static_batch._decode
        monkeypatch.setattr(static_batch, "_decode",
                            lambda e, batch: (batches.append([r.model for r in batch]), decode(e, batch))[1])
    else:
        forward = continuous.ContinuousBatcher._forward
        monkeypatch.setattr(continuous.ContinuousBatcher, "_forward",
                            lambda self, rows: (batches.append([r.request.model for r in rows]), forward(self, rows))[1])
    before = _histogram_count(url, "tunelab_batch_size")
    with ThreadPoolExecutor(max_workers=64) as pool:
        with engine.lock:  # the worker holds a first batch and waits: every other request queues meanwhile
            futures = [pool.submit(ask, job) for job in jobs]
            deadline = time.monotonic() + 60
            while engine.pending.qsize() < len(jobs) - engine.max_batch and time.monotonic() < deadline:
                time.sleep(0.05)
        concurrent = [f.result() for f in futures]
    assert concurrent == [sequential[job] for job in jobs]
    if batching == "static":  # each request is decoded in exactly one batch
        assert sorted(m for batch in batches for m in batch) == sorted(model for model, _ in jobs)
    assert max(len(batch) for batch in batches) == 16  # full batches, not one request at a time
    # Rows of different adapters (and of the base) were decoded together in one batch, each under its own.
    assert any({"base", "alpha", "beta"} <= set(batch) for batch in batches), batches
    assert _histogram_count(url, "tunelab_batch_size") - before == len(batches)


def test_admin_load_use_and_unload(server: str, lora_runs: dict[str, Path], tiny_model_dir: Path) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    loaded = httpx.post(f"{server}/admin/adapters", json={"name": "gamma", "path": str(lora_runs["gamma"])},
                        headers=headers, timeout=60)
    assert loaded.status_code == 200, loaded.text
    reply = client(server).chat.completions.create(
        model="gamma", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=8)
    assert reply.choices[0].message.content.strip() == reference_answer(lora_runs["gamma"], tiny_model_dir, PROMPTS[2], 8)
    again = httpx.post(f"{server}/admin/adapters", json={"name": "gamma", "path": str(lora_runs["gamma"])},
                       headers=headers, timeout=60)
    assert again.status_code == 409
    assert httpx.delete(f"{server}/admin/adapters/gamma", headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_unloading_the_last_adapter_leaves_the_base_serving_and_loads_again(live_server, lora_runs, batching) -> None:
    from tunelab.serve.adapters import resolve_adapter

    url, engine = live_server(adapters=("alpha",), batching=batching)
    c = client(url, key=None)

    def ask(model: str) -> str:
        return c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=8, temperature=0).choices[0].message.content

    base, alpha = ask("base"), ask("alpha")
    engine.unload_adapter("alpha")
    assert ask("base") == base  # PEFT left the deleted adapter active: every request failed with a 500
    with pytest.raises(openai.NotFoundError):
        ask("alpha")
    engine.load_adapter(resolve_adapter("alpha", str(lora_runs["alpha"]), None))
    assert (ask("base"), ask("alpha")) == (base, alpha)


def test_admin_refuses_traversal_and_bad_names(server: str, lora_runs: dict[str, Path]) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    outside = f"{lora_runs['gamma'].parent}/../../../etc"
    r = httpx.post(f"{server}/admin/adapters", json={"name": "evil", "path": outside}, headers=headers)
    assert r.status_code == 403 and "outside the allowed roots" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/admin/adapters", json={"name": "../x", "path": str(lora_runs["gamma"])}, headers=headers)
    assert r.status_code == 400
    r = httpx.post(f"{server}/admin/adapters", json={"name": "base", "path": str(lora_runs["gamma"])}, headers=headers)
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"]


def test_metrics_in_prometheus_text_format(server: str) -> None:
    client(server).chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert "# TYPE tunelab_requests_total counter" in text
    assert 'tunelab_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'tunelab_generated_tokens_total{model="alpha"}' in text
    assert "tunelab_adapters_loaded 2" in text or "tunelab_adapters_loaded 3" in text


def _histogram_count(url: str, name: str) -> int:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    line = next(line for line in text.splitlines() if line.startswith(f"{name}_count "))
    return int(float(line.split()[1]))
