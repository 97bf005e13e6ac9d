"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, plus admin endpoints
to load and unload adapters, /health, /metrics and the playground page.

Errors use OpenAI's body shape ({"error": {"message", "type", "code"}}) so official clients raise their
usual exceptions (AuthenticationError, NotFoundError, BadRequestError, RateLimitError).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from tunelab.errors import ModelError, ServeError, cut
from tunelab.families import answer_opening, gap_before_end, reasoning_markers, stop_texts, stop_token_ids
from tunelab.serve.adapters import BASE_NAME, adapter_tokenizer, check_name, check_same_base, resolve_adapter
from tunelab.serve.bodies import AdapterBody, ChatBody, CompletionBody, Sampling
from tunelab.serve.engine import Engine, GenRequest
from tunelab.serve.guard import Guard

# Below this a temperature decodes greedily (vLLM's _SAMPLING_EPS): dividing logits by 1e-300 overflows.
TEMPERATURE_FLOOR = 1e-5
POLL_SECONDS = 0.25  # how often a waiting handler looks for a gone client and a stuck engine
# Prompts longer than this (characters) are templated and tokenized one at a time on a thread of their own: a burst
# of them (seconds each) would otherwise hold every thread of the shared pool, and ordinary requests queue behind.
LARGE_PROMPT_CHARS = 100_000
# What a message costs the template and tokenizer beyond its content, counted as characters toward that limit: a
# body of 130,000 empty messages (3.8 MB) took 7 s to render, ~50 characters of content a message (tiny model).
MESSAGE_CHARS = 64


@dataclass
class ServerSettings:
    api_key: str | None = None
    admin_key: str | None = None  # None: no /admin endpoints
    allowed_roots: list[Path] = field(default_factory=list)
    allowed_registry: list[str] = field(default_factory=list)  # registered models admin may load ("*": any)
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    request_timeout: float = 120.0
    tracking_uri: str | None = None
    base_folder: Path | None = None  # adapters loaded while serving must have been trained on this base
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_stop: int = 4
    max_stop_chars: int = 64
    allowed_hosts: set[str] | None = None  # Host header values accepted; None: any


def error_response(err: ServeError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        err.status, "invalid_request_error" if err.status < 500 else "server_error")
    # Overload is temporary: tell clients (the openai client among them) when to try again.
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse({"error": {"message": str(err), "type": kind, "code": err.code, "param": None}},
                        status_code=err.status, headers=headers)


def create_app(engine: Engine, settings: ServerSettings, tokenizers: dict[str, Any]) -> FastAPI:
    """`tokenizers` maps each model name to the tokenizer whose chat template renders its prompts."""
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None)
    metrics = engine.metrics
    large_prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-large-prompt")

    app.add_middleware(Guard, settings=settings, metrics=metrics, routes=app.router.routes)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":  # loc is ("body", character offset)
            at = first.get("loc", ("body", 0))[-1]
            why = (first.get("ctx") or {}).get("error", "")
            return error_response(ServeError(f"invalid request: the body is not valid JSON ({why} at character {at})",
                                             400, "invalid_request"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(ServeError(f"invalid request: {where}: {first.get('msg')}", 400, "invalid_request"))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code, "error")
        detail = str(err.detail)
        if err.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's words for both
            detail, code = ("invalid request: the body could not be parsed as JSON (not UTF-8, or nested too "
                            "deeply)"), "invalid_request"
        return error_response(ServeError(detail, err.status_code, code))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        return error_response(ServeError(f"internal error: {type(err).__name__}", 500, "internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "models": engine.model_names(),
                             "queue_depth": engine.pending.qsize()}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    @app.get("/playground", response_class=HTMLResponse)
    async def playground() -> str:
        return resources.files("tunelab.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": BASE_NAME, "object": "model", "created": created, "owned_by": "tunelab", "root": BASE_NAME,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "tunelab", "root": spec.source,
                  "parent": BASE_NAME} for name, spec in engine.adapters.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        from tunelab.chat import encode_prompt_safely, with_system_prompt

        tokenizer = _tokenizer(body.model)
        spec = engine.adapters.get(body.model)
        # The adapter's own system prompt and template: the prompt it was trained on. Marker text inside the
        # messages stays text, so no one can forge a turn of the template.
        messages = with_system_prompt([m.model_dump() for m in body.messages], spec.system_prompt if spec else None)
        size = sum(len(m["content"]) + MESSAGE_CHARS for m in messages)
        return await _complete(body, lambda: encode_prompt_safely(tokenizer, messages), request, chat=True, size=size)

    @app.post("/v1/completions")
    async def complete(body: CompletionBody, request: Request) -> Any:
        from tunelab.chat import token_ids

        tokenizer = _tokenizer(body.model)
        if not body.prompt:
            raise ServeError("prompt is empty", 400, "invalid_prompt")
        # A completion prompt is the client's whole text, template markers included (as vLLM reads it).
        return await _complete(body, lambda: token_ids(tokenizer, body.prompt), request, chat=False,
                               size=len(body.prompt))

    if settings.admin_key:  # without an admin key the admin endpoints do not exist (404)
        @app.post("/admin/adapters")
        async def load(body: AdapterBody) -> dict[str, Any]:
            check_name(body.name)
            spec = await asyncio.to_thread(resolve_adapter, body.name, body.path, settings.allowed_roots,
                                           settings.tracking_uri, settings.allowed_registry)
            check_same_base(spec, settings.base_folder)
            tokenizer = await asyncio.to_thread(adapter_tokenizer, spec)
            await asyncio.to_thread(engine.load_adapter, spec)
            tokenizers[spec.name] = tokenizer
            return {"loaded": spec.describe(), "models": engine.model_names()}

        @app.delete("/admin/adapters/{name}")
        async def unload(name: str) -> dict[str, Any]:
            await asyncio.to_thread(engine.unload_adapter, name)
            tokenizers.pop(name, None)
            return {"unloaded": name, "models": engine.model_names()}

    def _tokenizer(model: str) -> Any:
        if model != BASE_NAME and model not in engine.adapters:
            raise ServeError(f"model '{cut(model)}' does not exist; loaded: {', '.join(engine.model_names())}", 404,
                             "model_not_found")
        return tokenizers[model]

    def _check_sampling(body: Sampling) -> tuple[int, list[str]]:
        """(max_tokens, stop strings) of a request, refused before any work is done on it."""
        unsupported = body.unsupported()
        if unsupported:
            raise ServeError(f"{', '.join(unsupported)}: not supported by this server (a text model's sampling: "
                             "max_tokens, temperature, top_p, stop, seed); leave it out or send its default",
                             400, "unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise ServeError("stream_options: only allowed when stream is true", 400, "invalid_request")
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ServeError(f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit}")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        # Stop strings are scanned at every step of the shared batch: their cost falls on every request in it.
        if len(stops) > settings.max_stop:
            raise ServeError(f"stop: {len(stops)} strings; at most {settings.max_stop}", 400, "invalid_stop")
        if any(len(x) > settings.max_stop_chars for x in stops):
            raise ServeError(f"stop: each string may have at most {settings.max_stop_chars} characters", 400,
                             "invalid_stop")
        return max_tokens, stops

    async def _complete(body: Sampling, encode: Any, request: Request, chat: bool, size: int) -> Any:
        started = time.monotonic()
        tokenizer = _tokenizer(body.model)
        max_tokens, stops = _check_sampling(body)
        # A template whose end-of-turn marker is not a single token ends an answer at its text.
        end_texts, end_gap = (stop_texts(tokenizer), gap_before_end(tokenizer)) if chat else ([], "")
        opening = answer_opening(tokenizer) if chat else ""
        # Templating and tokenizing a long prompt takes a while: off the event loop, so others are not held up.
        try:
            if size > LARGE_PROMPT_CHARS:
                prompt_ids = await asyncio.get_running_loop().run_in_executor(large_prompts, encode)
            else:
                prompt_ids = await asyncio.to_thread(encode)
        except (ModelError, TemplateError) as err:  # TemplateError: the template's own raise_exception()
            raise ServeError(f"cannot render this conversation: {err}", 400, "invalid_prompt") from None
        if not prompt_ids:
            raise ServeError("prompt is empty", 400, "invalid_prompt")
        limit = settings.max_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            raise ServeError(f"prompt has {len(prompt_ids)} tokens; this server accepts at most {limit} "
                             "(--max-prompt-tokens)", 400, "context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        deadline = started + settings.request_timeout
        job = GenRequest(
            model=body.model, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=0.0 if body.temperature < TEMPERATURE_FLOOR else body.temperature,
            top_p=body.top_p, stop=stops, seed=body.seed, deadline=deadline,
            stop_ids=frozenset(stop_token_ids(tokenizer)), tokenizer=tokenizer, end_texts=end_texts, end_gap=end_gap,
            opening=opening, reasoning=reasoning_markers(tokenizer) if chat else None,
            # Fair admission across peer addresses, then across the end users (OpenAI's `user`) behind each.
            client=(request.client.host if request.client else "", body.user or ""),
            emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
        )
        engine.submit(job)  # raises 404 / 400 / 429 / 503 before anything is streamed
        metrics.inc("tunelab_prompt_tokens_total", len(prompt_ids), model=body.model)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        checked = [time.monotonic()]

        async def next_event() -> tuple[str, Any] | None:
            """The engine's next event; None once the client has gone. A 504 when the engine has not answered a
            second past the deadline (a long batch it cannot leave early)."""
            while True:
                if time.monotonic() - checked[0] > POLL_SECONDS:  # also while tokens keep coming
                    checked[0] = time.monotonic()
                    if await request.is_disconnected():
                        metrics.inc("tunelab_cancelled_total", reason="disconnected")
                        return None
                    if checked[0] > deadline + 1.0:
                        return "error", ServeError("request timed out", 504, "timeout")
                try:
                    return await asyncio.wait_for(events.get(), timeout=POLL_SECONDS)
                except TimeoutError:
                    continue

        def usage(completion_tokens: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}

        if not body.stream:
            parts, thoughts = [], []
            try:
                while True:
                    event = await next_event()
                    if event is None:
                        return Response(status_code=499)  # nginx's "client closed request"; no one reads it
                    kind, payload = event
                    if kind == "delta":
                        parts.append(payload)
                    elif kind == "reasoning":
                        thoughts.append(payload)
                    elif kind == "error":
                        raise payload
                    else:
                        break
            finally:
                job.cancelled.set()  # the client may have gone; the engine stops spending tokens on it
            metrics.observe("tunelab_request_seconds", time.monotonic() - started)
            text = "".join(parts)
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                                      else {"index": 0, "text": text, "logprobs": None})
            if thoughts:  # a reasoning model's block, apart from the answer (vLLM's and DeepSeek's field)
                choice["message"]["reasoning_content"] = "".join(thoughts)
            choice["finish_reason"] = payload["finish_reason"]
            return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": body.model, "choices": [choice], "usage": usage(payload["completion_tokens"])}

        async def sse() -> Any:
            kind_name = "chat.completion.chunk" if chat else "text_completion"
            # OpenAI's include_usage: every chunk carries "usage": null, and one last chunk (no choices) the counts.
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            ended = False

            def chunk(delta: str | None, finish: str | None, first: bool = False, field: str = "content") -> str:
                if chat:
                    d: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                        {field: delta} if delta is not None else {})
                    choice = {"index": 0, "delta": d, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                data = {"id": ident, "object": kind_name, "created": created, "model": body.model, "choices": [choice]}
                if with_usage:
                    data["usage"] = None
                return f"data: {json.dumps(data)}\n\n"

            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    event = await next_event()
                    if event is None:
                        ended = True  # counted by next_event
                        return
                    kind, payload = event
                    if kind == "delta":
                        yield chunk(payload, None)
                    elif kind == "reasoning":
                        yield chunk(payload, None, field="reasoning_content")
                    elif kind == "error":
                        ended = True
                        error = {"error": {"message": str(payload), "type": "server_error", "code": payload.code}}
                        yield f"data: {json.dumps(error)}\n\n"
                        return
                    else:
                        ended = True
                        yield chunk(None, payload["finish_reason"])
                        if with_usage:
                            data = {"id": ident, "object": kind_name, "created": created, "model": body.model,
                                    "choices": [], "usage": usage(payload["completion_tokens"])}
                            yield f"data: {json.dumps(data)}\n\n"
                        metrics.observe("tunelab_request_seconds", time.monotonic() - started)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled.set()
                if not ended:  # the server cut the stream off because its client went away mid-answer
                    metrics.inc("tunelab_cancelled_total", reason="disconnected")

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
