"""The engine worker's internal routes: how gateways use this process's engine.

Mounted when `expose_engine_api` is on; the client is service/engine/remote.py, the wire format
service/engine/wire.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.deps import ApiError
from service.engine.base import Engine, EngineOverloaded, EngineUnavailable, ReasoningDelta
from service.engine.wire import WireRequest, items_to_wire
from service.rollout import ModelHost

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


async def leased_engine(body: WireRequest, request: Request) -> AsyncIterator[Engine]:
    """The engine of the version the gateway planned for, held until the response is sent."""
    host: ModelHost | None = getattr(request.app.state, "host", None)
    if host is None or host.current is None:
        raise EngineUnavailable("engine is not ready")
    if body.model_version is not None and host.find(body.model_version) is None:
        raise ApiError(409, "version_not_served", f"this worker serves {', '.join(host.loaded_versions)}, "
                       f"not {body.model_version}")
    async with host.lease(body.model_version) as deployment:
        if not deployment.engine.ready:
            raise EngineUnavailable("engine is not ready")
        yield deployment.engine


LeasedEngine = Annotated[Engine, Depends(leased_engine)]


def worker_router(dependencies: Sequence[Any] = ()) -> APIRouter:
    """Routes through which gateways use this process's engine (the served version's, or the
    version the request names while this worker still has it loaded)."""
    router = APIRouter(prefix="/internal/engine", tags=["internal"], include_in_schema=False,
                       dependencies=[Depends(d) for d in dependencies])

    @router.post("/topk")
    async def topk(body: WireRequest, engine: LeasedEngine) -> JSONResponse:
        items = await engine.recommend(body.engine_request())
        return JSONResponse({"items": items_to_wire(items)})

    @router.post("/reason")
    async def reason(body: WireRequest, engine: LeasedEngine) -> StreamingResponse:

        async def lines() -> AsyncIterator[str]:
            events = engine.reason(body.engine_request(), body.max_reasoning_tokens or 256)
            try:
                async for event in events:
                    if isinstance(event, ReasoningDelta):
                        yield json.dumps({"delta": event.text}) + "\n"
                    else:
                        yield json.dumps({"items": items_to_wire(event.items),
                                          "reasoning_tokens": event.reasoning_tokens,
                                          "finish_reason": event.finish_reason}) + "\n"
            except EngineOverloaded as exc:
                yield json.dumps({"error": {"code": "overloaded", "message": str(exc)}}) + "\n"
            except Exception as exc:  # the stream has started: report in-band
                log.exception("engine worker stream failed")
                yield json.dumps({"error": {"code": "engine_error", "message": str(exc)}}) + "\n"
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        return _ClosingStreamingResponse(lines(), media_type="application/x-ndjson")

    return router
