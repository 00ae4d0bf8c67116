"""The recommendation stream as server-sent events: `reasoning {delta}*`, then `items {items}` and
`done {...}`, or `error {code, message}` once the stream has started. Framing, keep-alive pings and
noticing a client that went away are sse-starlette's; each event's `data` is one of the typed
payloads of `service.api.schemas`, documented in the OpenAPI document as components."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.api.schemas import (
    STREAM_EVENTS,
    DoneEvent,
    ErrorEvent,
    ItemsEvent,
    ReasoningEvent,
    SectionCitations,
    item_out,
)
from service.engine.base import EngineOverloaded, EngineUnavailable, ReasoningDelta
from service.metrics import Metrics
from service.recommender import Plan, Recommender, StreamDone
from service.recommender import Query as RecQuery

log = logging.getLogger("gream.api")

# A comment line this often keeps proxies from closing a stream that waits in the engine's queue.
PING_SECONDS = 15
# On shutdown a stream in flight gets this long to finish; uvicorn waits 10 s for the whole server.
SHUTDOWN_GRACE_SECONDS = 8.0
_COMPONENTS = "#/components/schemas/"


def sse(event: str, payload: BaseModel) -> ServerSentEvent:
    # "\n" line ends, as EventSource clients and the tests read them.
    return ServerSentEvent(payload.model_dump_json(), event=event, sep="\n")


def error_event(exc: BaseException) -> ServerSentEvent:
    if isinstance(exc, EngineOverloaded):
        return sse("error", ErrorEvent(code="overloaded", message=str(exc)))
    if isinstance(exc, EngineUnavailable):
        return sse("error", ErrorEvent(code="engine_unavailable", message=str(exc)))
    return sse("error", ErrorEvent(code="internal_error", message=f"{type(exc).__name__}: {exc}"))


async def stream_events(plan: Plan, first: ReasoningDelta | StreamDone | None,
                        events: AsyncIterator[ReasoningDelta | StreamDone],
                        metrics: Metrics) -> AsyncIterator[ServerSentEvent]:
    """The events of one stream. Closing this iterator (a client that went away) closes the engine's,
    which aborts its generation."""
    finished = False
    try:
        event = first
        while event is not None:
            if isinstance(event, ReasoningDelta):
                yield sse("reasoning", ReasoningEvent(delta=event.text))
            else:
                result = event.result
                yield sse("items", ItemsEvent.model_construct(items=[item_out(i) for i in result.items]))
                finished = True
                yield sse("done", DoneEvent(
                    request_id=plan.request_id, reasoning_tokens=result.reasoning_tokens,
                    latency_ms=round((time.perf_counter() - plan.started) * 1000, 3),
                    finish_reason=result.finish_reason,  # type: ignore[arg-type]
                    citations=[SectionCitations(section=s, item_ids=ids)  # type: ignore[arg-type]
                               for s, ids in result.citations]))
            event = await anext(events, None)
    except Exception as exc:  # the stream has started: report in-band, then end it
        log.warning("stream failed after start", exc_info=exc)
        yield error_event(exc)
    except BaseException:
        if not finished:
            metrics.stream_disconnects.inc()
        raise
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def open_stream(query: RecQuery, reasoning_budget: int, recommender: Recommender, metrics: Metrics,
                      rid: str) -> EventSourceResponse:
    plan = await recommender.plan(query, rid)
    events = recommender.stream(plan, reasoning_budget)
    # Wait for the first event before answering, so overload and engine failures are real HTTP
    # statuses (429/503) rather than in-band errors.
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    return EventSourceResponse(stream_events(plan, first, events, metrics), headers={"Cache-Control": "no-cache"},
                               sep="\n", ping=PING_SECONDS, shutdown_grace_period=SHUTDOWN_GRACE_SECONDS)


def _event_schema(name: str, payload: type[BaseModel]) -> dict[str, Any]:
    # OpenAPI 3.2's way to describe an event stream: `itemSchema` is one event, its `data` JSON text.
    return {"type": "object", "title": f"{name} event", "description": payload.__doc__ or name,
            "required": ["event", "data"],
            "properties": {"event": {"type": "string", "const": name},
                           "data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": _COMPONENTS + payload.__name__}}}}


STREAM_OK: dict[int | str, dict[str, Any]] = {200: {
    "description": "server-sent events: reasoning {delta}*, items {items}, done {request_id, reasoning_tokens, "
                   "latency_ms, finish_reason, citations}; error {code, message} instead when the stream fails after it started",
    "content": {"text/event-stream": {"itemSchema": {
        "oneOf": [_event_schema(name, payload) for name, payload in STREAM_EVENTS.items()]}}}}}


def document_stream_events(app: FastAPI) -> None:
    """Add the event payloads to the app's OpenAPI components: the stream routes refer to them, but
    FastAPI only collects the models of JSON bodies."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            _, definitions = models_json_schema([(m, "serialization") for m in STREAM_EVENTS.values()],
                                                ref_template=_COMPONENTS + "{model}")
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in definitions.get("$defs", {}).items():
                components.setdefault(name, schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
