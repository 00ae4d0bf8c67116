"""POST /v1/recommendations and its streaming twin (server-sent events)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.deps import (
    MetricsDep,
    RecommenderDep,
    RequestIdDep,
    SettingsDep,
    field_errors,
    require_api_key,
    require_api_key_or_query,
)
from service.api.schemas import (
    ErrorBody,
    ItemOut,
    RecommendationRequest,
    RecommendationResponse,
    StreamRecommendationRequest,
)
from service.config import Settings
from service.engine.base import EngineOverloaded, EngineUnavailable, ReasoningDelta
from service.metrics import Metrics
from service.recommender import Plan, RecommendedItem, Recommender, Result, StreamDone
from service.recommender import Query as RecQuery

log = logging.getLogger("gream.api")

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"],
                   dependencies=[Depends(require_api_key)])
# GET /v1/recommendations/stream, for the browser's EventSource: the only route that also takes the API key
# as a query parameter, since EventSource can neither POST nor set headers.
eventsource_router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"],
                               dependencies=[Depends(require_api_key_or_query)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    413: {"model": ErrorBody, "description": "body larger than the limit"},
    422: {"model": ErrorBody, "description": "invalid field, limit exceeded, or unknown item ids"},
    429: {"model": ErrorBody, "description": "engine queue full (see Retry-After)"},
    503: {"model": ErrorBody, "description": "history store or engine unavailable"},
}


def to_query(body: RecommendationRequest) -> RecQuery:
    return RecQuery(user_id=body.user_id, history=body.history, k=body.k, exclude_seen=body.exclude_seen,
                 exclude_items=body.exclude_items, allow_items=body.allow_items)


def item_model(item: RecommendedItem) -> ItemOut:
    # model_construct: these values come from our own catalog and engine, validating them again is waste.
    return ItemOut.model_construct(item_id=item.item_id, title=item.title, semantic_id=item.semantic_id,
                                   score=item.score, fallback=item.fallback)


def item_out(item: RecommendedItem) -> dict[str, Any]:
    return item_model(item).model_dump()


class PreSerialized(Response):
    media_type = "application/json"


def to_response(result: Result) -> PreSerialized:
    """The response body, serialised once by pydantic's Rust core. Returning a Response keeps FastAPI
    from validating and re-encoding our own output (`response_model` still documents the schema)."""
    body = RecommendationResponse.model_construct(
        request_id=result.request_id, model_version=result.model_version, user_id=result.user_id,
        items=[item_model(i) for i in result.items], history_used=result.history_used,
        history_source=result.history_source, fallback=result.fallback)
    return PreSerialized(body.model_dump_json())


@router.post("", response_model=RecommendationResponse, responses=ERRORS,
             summary="Top-k next items for a history (the request's, else the user's cached one)")
async def recommend(body: RecommendationRequest, settings: SettingsDep, recommender: RecommenderDep,
                    rid: RequestIdDep) -> Response:
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors(problems)
    return to_response(await recommender.recommend(to_query(body), rid))


# ------------------------------------------------------------------ streaming
class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, so an abandoned stream aborts the engine
    work at once instead of whenever the generator is garbage-collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_event(exc: BaseException) -> str:
    if isinstance(exc, EngineOverloaded):
        return sse("error", {"code": "overloaded", "message": str(exc)})
    if isinstance(exc, EngineUnavailable):
        return sse("error", {"code": "engine_unavailable", "message": str(exc)})
    return sse("error", {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})


async def event_frames(plan: Plan, first: ReasoningDelta | StreamDone | None,
                       events: AsyncIterator[ReasoningDelta | StreamDone], metrics: Metrics) -> AsyncIterator[str]:
    finished = False
    try:
        event = first
        while event is not None:
            if isinstance(event, ReasoningDelta):
                yield sse("reasoning", {"delta": event.text})
            else:
                result = event.result
                yield sse("items", {"items": [item_out(i) for i in result.items]})
                finished = True
                yield sse("done", {"request_id": plan.request_id, "reasoning_tokens": result.reasoning_tokens,
                                   "latency_ms": round((time.perf_counter() - plan.started) * 1000, 3)})
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


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS, 200: {"content": {"text/event-stream": {}},
                    "description": "events: reasoning {delta}*, items {items}, done {request_id, "
                                   "reasoning_tokens, latency_ms}; error {code, message} on failure"}}


@router.post("/stream", response_class=EventStreamResponse, responses=STREAM_RESPONSES,
             summary="Stream the model's reasoning, then the items (server-sent events)")
async def recommend_stream(body: StreamRecommendationRequest, settings: SettingsDep,
                           recommender: RecommenderDep, metrics: MetricsDep, rid: RequestIdDep) -> EventStreamResponse:
    return await open_stream(body, settings, recommender, metrics, rid)


async def open_stream(body: StreamRecommendationRequest, settings: Settings, recommender: Recommender,
                      metrics: Metrics, rid: str) -> EventStreamResponse:
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors(problems)
    plan = await recommender.plan(to_query(body), rid)
    events = recommender.stream(plan, body.max_reasoning_tokens or settings.reasoning_budget_default)
    # Wait for the first event before answering, so overload and engine failures are real HTTP
    # statuses (429/503) rather than in-band errors.
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    return EventStreamResponse(event_frames(plan, first, events, metrics),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def split_ids(values: list[str] | None, known: dict[str, int]) -> list[str] | None:
    """Item ids from repeated and/or comma-separated query values. A value that is itself a catalog id
    is kept whole, so ids that contain commas still work when sent one per parameter."""
    if values is None:
        return None
    out: list[str] = []
    for value in values:
        if value in known:
            out.append(value)
        else:
            out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


@eventsource_router.get(
    "/stream", response_class=EventStreamResponse, responses=STREAM_RESPONSES,
    summary="The stream for EventSource clients: the same events, the request as query parameters",
    description="`history` may be repeated (`history=a&history=b`) or comma-separated (`history=a,b`); "
                "`history=` (empty) means an empty history. When API keys are configured, the key may be sent "
                "as `api_key` (this route only; it is never logged). EventSource reconnects when a stream "
                "ends, so close it on `done` or `error`; its own connection failures also arrive as `error` "
                "events, without `data`.")
async def recommend_stream_get(
        settings: SettingsDep, recommender: RecommenderDep, metrics: MetricsDep, rid: RequestIdDep,
        user_id: Annotated[str | None, Query(description="whose cached history to use when `history` is absent")
                           ] = None,
        history: Annotated[list[str] | None, Query(description="item ids, oldest first; overrides the cache")
                           ] = None,
        k: Annotated[int, Query(ge=1, description="number of items (1..max_k)")] = 10,
        exclude_seen: Annotated[bool, Query(description="never return items of the history")] = True,
        max_reasoning_tokens: Annotated[int | None, Query(ge=1, description="reasoning budget")] = None,
) -> EventStreamResponse:
    fields = {"user_id": user_id, "history": split_ids(history, recommender.bundle.index_of), "k": k,
              "exclude_seen": exclude_seen, "max_reasoning_tokens": max_reasoning_tokens}
    try:
        body = StreamRecommendationRequest(**fields)
    except ValidationError as exc:
        raise field_errors([("query." + str(err["loc"][0]) if err.get("loc") else "query", err["msg"])
                            for err in exc.errors()]) from None
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors([("query." + name, message) for name, message in problems])
    return await open_stream(body, settings, recommender, metrics, rid)
