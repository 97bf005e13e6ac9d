"""The checks every HTTP request passes before it reaches a route: Host header, content type, body size, API and
admin keys, and the count in /metrics. A plain ASGI middleware, so that the body limit applies while the body
is read and `Request.is_disconnected` still sees the client go.

Every check reads the path routing sees (`scope["path"]`), never one rebuilt from the URL and the Host header:
a Host of `x/health?` turns the URL path of a request for /v1/models into `/health`.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.routing import Match

from tunelab.errors import ServeError

if TYPE_CHECKING:
    from tunelab.serve.api import ServerSettings
    from tunelab.serve.metrics import Metrics

OPEN_PATHS = {"/health", "/", "/playground"}  # everything else needs the API key when one is set


class Guard:
    def __init__(self, app: Any, *, settings: ServerSettings, metrics: Metrics, routes: Any) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.routes = routes  # the app's router's routes, to label /metrics by route template

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from tunelab.serve.api import error_response

        status = [500]

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        label = self.route_label(scope)
        refusal = self.refusal(scope, label)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send_counted)
        else:
            await self.app(scope, self.limited(receive), send_counted)
        # Unmatched paths share one label: a client must not grow /metrics with every path it invents.
        self.metrics.inc("tunelab_requests_total", endpoint=label, status=str(status[0]))

    def route_label(self, scope: dict[str, Any]) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return "other"

    def refusal(self, scope: dict[str, Any], label: str) -> ServeError | None:
        s = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if s.allowed_hosts is not None and headers.get("host", "") not in s.allowed_hosts:
            return ServeError(f"Host header {headers.get('host', '')!r} does not name this server (keyless loopback "
                              f"serving answers only {', '.join(sorted(s.allowed_hosts))})", 403, "forbidden_host")
        path = scope["path"]
        if s.api_key and path not in OPEN_PATHS and not label.startswith("/admin/"):
            if not _bearer_matches(headers, s.api_key):
                return ServeError("missing or wrong API key (send 'Authorization: Bearer KEY')", 401, "invalid_api_key")
        if label.startswith("/admin/") and not (s.admin_key and _bearer_matches(headers, s.admin_key)):
            return ServeError("missing or wrong admin key (send 'Authorization: Bearer ADMIN_KEY')", 401,
                              "invalid_api_key")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return ServeError(f"send the body as JSON (Content-Type: application/json), not {media or 'nothing'}",
                                  415, "unsupported_media_type")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > s.max_body_bytes:
                return _too_large(s.max_body_bytes)
        return None

    def limited(self, receive: Any) -> Any:
        """`receive` that refuses (413) a body growing past the limit, for bodies sent without a length."""
        limit, seen = self.settings.max_body_bytes, [0]

        async def receive_limited() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    # An HTTPException passes through FastAPI's body reading unchanged; the app's handler
                    # turns it into OpenAI's error shape.
                    raise HTTPException(413, str(_too_large(limit)))
            return message

        return receive_limited


def _too_large(limit: int) -> ServeError:
    return ServeError(f"request body is larger than this server's --max-body-bytes of {limit}", 413,
                      "request_too_large")


def _bearer_matches(headers: dict[str, str], key: str) -> bool:
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())
