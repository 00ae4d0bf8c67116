"""The gateway application: `create_app(settings)` wires settings, bundle, engine, history store,
metrics and routers; `serve(overrides)` runs it with uvicorn.

The lifespan (service.lifespan) connects the history store, loads and warms the first model version
and, with a registry, follows it (service.rollout); /readyz reports "starting" until then. One pure-ASGI middleware gives every request
an id (X-Request-Id accepted or generated, echoed, passed to the engine and to every log line),
enforces the body-size limit before anything parses the body, and records the access log and the
per-route metrics. It is not a BaseHTTPMiddleware, which would get in the way of streaming and of
noticing client disconnects.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import require_api_key
from service.api.errors import install_error_handlers, json_error
from service.api.routes import admin, health, items, recommendations, users
from service.api.streaming import document_stream_events
from service.config import Settings, load_settings
from service.engine.base import Engine
from service.history import HistoryStore
from service.lifespan import gateway_lifespan
from service.metrics import Metrics
from service.runtime import REQUEST_ID, configure_logging

log = logging.getLogger("gream")
access_log = logging.getLogger("gream.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


# ------------------------------------------------------------------ middleware
class GatewayMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    def _body_limit(self, path: str) -> int:
        # Engine-worker calls carry prompts and index lists, larger than public bodies.
        return self.settings.max_body_bytes * (8 if path.startswith("/internal/") else 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        supplied = headers.get(b"x-request-id", b"").decode("latin-1").strip()
        rid = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)
        started = time.perf_counter()
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = rid
            await send(message)

        try:
            if scope["method"] in _BODY_METHODS:
                receive = await self._bounded_body(scope, receive, send_with_id, headers, rid)
                if receive is None:
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, scope["method"], status[0], elapsed)
            access_log.info("request", extra={"method": scope["method"], "path": scope["path"], "route": route,
                                              "status": status[0], "latency_ms": round(elapsed * 1000, 3)})
            REQUEST_ID.reset(token)

    async def _bounded_body(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes],
                            rid: str) -> Receive | None:
        """Read the whole body (it is small by construction) and replay it; None when it was refused."""
        limit = self._body_limit(scope["path"])

        async def too_large(scope: Scope, receive: Receive, send: Send) -> None:  # built only when needed
            await json_error(413, "payload_too_large", f"request body exceeds {limit} bytes", rid,
                              errors=[{"field": "body", "message": f"at most {limit} bytes"}])(scope, receive, send)

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as streaming needs

        return replay


# ------------------------------------------------------------------ application
def create_app(settings: Settings | None = None, engine: Engine | None = None,
               history_store: HistoryStore | None = None) -> FastAPI:
    """The gateway. An `engine` or `history_store` passed in is used as is and left open on shutdown
    (the caller owns it); otherwise the lifespan builds them from the settings and closes them."""
    settings = settings or load_settings()
    metrics = Metrics()

    app = FastAPI(title="GREAM Serve", version="0.1.0", lifespan=gateway_lifespan(settings, metrics, engine, history_store),
                  description="Generative recommendation with semantic item IDs: trie-constrained top-k, "
                              "streamed reasoning, cached user histories.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.bundle = app.state.engine = app.state.history = app.state.recommender = None
    app.state.search = app.state.host = app.state.watcher = None
    app.state.starting = True
    install_error_handlers(app)
    document_stream_events(app)
    for module in (recommendations, users, items, health, admin):
        app.include_router(module.router)
    app.include_router(recommendations.eventsource_router)
    if settings.expose_engine_api:
        from service.api.routes.worker import worker_router

        app.include_router(worker_router(dependencies=[require_api_key]))
    if settings.demo_page:
        _mount_demo_page(app)
    app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics)
    return app


_STATIC_DIR = Path(__file__).resolve().parent / "static"
# The demo page loads nothing from elsewhere (these machines have no internet, and it handles an API key).
_DEMO_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _mount_demo_page(app: FastAPI) -> None:
    """The browser demo at /demo (settings.demo_page): static HTML, CSS and JavaScript, no build step.
    Its assets are referenced relative to the page, so it also works behind a path prefix."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/demo", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(_STATIC_DIR / "demo.html", media_type="text/html", headers=_DEMO_HEADERS)

    app.mount("/demo/assets", StaticFiles(directory=_STATIC_DIR), name="demo-assets")


def serve(overrides: dict[str, Any] | None = None) -> None:
    """Run the gateway with uvicorn; `overrides` are Settings field names (None = not given)."""
    import uvicorn

    settings = load_settings(overrides)
    configure_logging(settings.log_json, settings.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                access_log=False, timeout_graceful_shutdown=10)
