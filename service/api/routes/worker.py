"""The engine worker's internal routes: how gateways use this process's engine (`app.state.engine`).

Mounted when `expose_engine_api` is on; the client is service/engine/remote.py, the wire format
service/engine/wire.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.engine.base import Engine, EngineOverloaded, EngineUnavailable, ReasoningDelta
from service.engine.wire import WireRequest, items_to_wire

log = logging.getLogger("gream.engine.worker")


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its iterator however the response ends, so a gateway that hangs up aborts the engine's
    generation at once instead of whenever the generator is garbage-collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def worker_router(dependencies: Sequence[Any] = ()) -> APIRouter:
    """Routes through which gateways use this process's engine (`request.app.state.engine`)."""
    router = APIRouter(prefix="/internal/engine", tags=["internal"], include_in_schema=False,
                       dependencies=[Depends(d) for d in dependencies])

    def engine_of(request: Request) -> Engine:
        engine = getattr(request.app.state, "engine", None)
        if engine is None or not engine.ready:
            raise EngineUnavailable("engine is not ready")
        return engine  # type: ignore[no-any-return]

    @router.post("/topk")
    async def topk(body: WireRequest, request: Request) -> JSONResponse:
        items = await engine_of(request).recommend(body.engine_request())
        return JSONResponse({"items": items_to_wire(items)})

    @router.post("/reason")
    async def reason(body: WireRequest, request: Request) -> StreamingResponse:
        engine = engine_of(request)

        async def lines() -> AsyncIterator[str]:
            events = engine.reason(body.engine_request(), body.max_reasoning_tokens or 256)
            try:
                async for event in events:
                    if isinstance(event, ReasoningDelta):
                        yield json.dumps({"delta": event.text}) + "\n"
                    else:
                        yield json.dumps({"items": items_to_wire(event.items),
                                          "reasoning_tokens": event.reasoning_tokens}) + "\n"
            except EngineOverloaded as exc:
                yield json.dumps({"error": {"code": "overloaded", "message": str(exc)}}) + "\n"
            except Exception as exc:  # the stream has started: report in-band
                log.exception("engine worker stream failed")
                yield json.dumps({"error": {"code": "engine_error", "message": str(exc)}}) + "\n"
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        return _ClosingStreamingResponse(lines(), media_type="application/x-ndjson")

    return router
