"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, plus admin endpoints
to load and unload adapters, /health, /metrics and the playground page.

Errors use OpenAI's body shape ({"error": {"message", "type", "code"}}) so official clients raise their
usual exceptions (AuthenticationError, NotFoundError, BadRequestError, RateLimitError).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.families import stop_texts, stop_token_ids
from tunelab.serve.adapters import BASE_NAME, ServeError, check_name, check_same_base, resolve_adapter
from tunelab.serve.engine import Engine, GenRequest

OPEN_PATHS = {"/health", "/", "/playground"}  # everything else needs the API key when one is set


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs=False...)
    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatBody(Sampling):
    messages: list[Message] = Field(..., min_length=1)


class CompletionBody(Sampling):
    prompt: str


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


@dataclass
class ServerSettings:
    api_key: str | None = None
    allowed_roots: list[Path] = field(default_factory=list)
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    request_timeout: float = 120.0
    tracking_uri: str | None = None
    base_folder: Path | None = None  # adapters loaded while serving must have been trained on this base


def error_response(err: ServeError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        err.status, "invalid_request_error" if err.status < 500 else "server_error")
    return JSONResponse({"error": {"message": str(err), "type": kind, "code": err.code, "param": None}},
                        status_code=err.status)


def create_app(engine: Engine, settings: ServerSettings, tokenizers: dict[str, Any]) -> FastAPI:
    """`tokenizers` maps each model name to the tokenizer whose chat template renders its prompts."""
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None)
    metrics = engine.metrics

    @app.middleware("http")
    async def authenticate_and_count(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if settings.api_key and path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                response = error_response(ServeError("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                                     401, "invalid_api_key"))
                metrics.inc("tunelab_requests_total", endpoint=path, status="401")
                return response
        response = await call_next(request)
        metrics.inc("tunelab_requests_total", endpoint=path, status=str(response.status_code))
        return response

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(ServeError(f"invalid request: {where}: {first.get('msg')}", 400, "invalid_request"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.model_names(), "queue_depth": engine.pending.qsize()}

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
        from tunelab.chat import render_prompt, with_system_prompt

        tokenizer = _tokenizer(body.model)
        spec = engine.adapters.get(body.model)
        messages = [m.model_dump() for m in body.messages]
        # The adapter's own system prompt and template: the prompt it was trained on.
        prompt = render_prompt(tokenizer, with_system_prompt(messages, spec.system_prompt if spec else None))
        return await _complete(body, prompt, request, chat=True)

    @app.post("/v1/completions")
    async def complete(body: CompletionBody, request: Request) -> Any:
        _tokenizer(body.model)
        return await _complete(body, body.prompt, request, chat=False)

    @app.post("/admin/adapters")
    async def load(body: AdapterBody) -> dict[str, Any]:
        check_name(body.name)
        spec = await asyncio.to_thread(resolve_adapter, body.name, body.path, settings.allowed_roots,
                                       settings.tracking_uri)
        check_same_base(spec, settings.base_folder)
        from tunelab.artifacts import RunPaths
        from tunelab.eval.run import trained_folder
        from tunelab.models import load_tokenizer

        tokenizer = await asyncio.to_thread(load_tokenizer, trained_folder(RunPaths(spec.run_dir)))
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
            raise ServeError(f"model '{model}' does not exist; loaded: {', '.join(engine.model_names())}", 404,
                             "model_not_found")
        return tokenizers[model]

    async def _complete(body: Sampling, prompt: str, request: Request, chat: bool) -> Any:
        started = time.monotonic()
        tokenizer = _tokenizer(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ServeError(f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit}")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if chat:
            stops += stop_texts(tokenizer)  # a template whose end-of-turn marker is not a single token
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        job = GenRequest(
            model=body.model, prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.temperature,
            top_p=body.top_p, stop=stops, seed=body.seed, deadline=started + settings.request_timeout,
            stop_ids=frozenset(stop_token_ids(tokenizer)), tokenizer=tokenizer,
            emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
        )
        engine.submit(job)  # raises 404 / 400 / 429 before anything is streamed
        metrics.inc("tunelab_prompt_tokens_total", len(prompt_ids), model=body.model)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def usage(completion_tokens: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}

        if not body.stream:
            parts = []
            try:
                while True:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=settings.request_timeout + 5)
                    if kind == "delta":
                        parts.append(payload)
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
            choice["finish_reason"] = payload["finish_reason"]
            return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": body.model, "choices": [choice], "usage": usage(payload["completion_tokens"])}

        async def sse() -> Any:
            kind_name = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
                if chat:
                    d: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                        {"content": delta} if delta is not None else {})
                    choice = {"index": 0, "delta": d, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                data = {"id": ident, "object": kind_name, "created": created, "model": body.model, "choices": [choice]}
                return f"data: {json.dumps(data)}\n\n"

            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    if await request.is_disconnected():
                        return
                    try:
                        kind, payload = await asyncio.wait_for(events.get(), timeout=1.0)
                    except TimeoutError:
                        continue
                    if kind == "delta":
                        yield chunk(payload, None)
                    elif kind == "error":
                        error = {"error": {"message": str(payload), "type": "server_error", "code": payload.code}}
                        yield f"data: {json.dumps(error)}\n\n"
                        return
                    else:
                        yield chunk(None, payload["finish_reason"])
                        metrics.observe("tunelab_request_seconds", time.monotonic() - started)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
