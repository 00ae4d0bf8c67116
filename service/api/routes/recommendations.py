"""POST /v1/recommendations and its streaming twin (server-sent events)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.deps import (
    MetricsDep,
    RecommenderDep,
    RequestIdDep,
    SettingsDep,
    field_errors,
    require_api_key,
)
from service.api.schemas import (
    ErrorBody,
    ItemOut,
    RecommendationRequest,
    RecommendationResponse,
    StreamRecommendationRequest,
)
from service.engine.base import EngineOverloaded, EngineUnavailable, ReasoningDelta
from service.metrics import Metrics
from service.recommender import Plan, Query, RecommendedItem, Result, StreamDone

log = logging.getLogger("gream.api")

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"],
                   dependencies=[Depends(require_api_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    413: {"model": ErrorBody, "description": "body larger than the limit"},
    422: {"model": ErrorBody, "description": "invalid field, limit exceeded, or unknown item ids"},
    429: {"model": ErrorBody, "description": "engine queue full (see Retry-After)"},
    503: {"model": ErrorBody, "description": "history store or engine unavailable"},
}


def to_query(body: RecommendationRequest) -> Query:
    return Query(user_id=body.user_id, history=body.history, k=body.k, exclude_seen=body.exclude_seen,
                 exclude_items=body.exclude_items, allow_items=body.allow_items)


def item_out(item: RecommendedItem) -> dict[str, Any]:
    return ItemOut(item_id=item.item_id, title=item.title, semantic_id=item.semantic_id, score=item.score,
                   fallback=item.fallback).model_dump()  # type: ignore[arg-type]


def to_response(result: Result) -> RecommendationResponse:
    return RecommendationResponse(request_id=result.request_id, model_version=result.model_version,
                                  user_id=result.user_id, items=[item_out(i) for i in result.items],  # type: ignore[misc]
                                  history_used=result.history_used, history_source=result.history_source,
                                  fallback=result.fallback)  # type: ignore[arg-type]


@router.post("", response_model=RecommendationResponse, responses=ERRORS,
             summary="Top-k next items for a history (the request's, else the user's cached one)")
async def recommend(body: RecommendationRequest, settings: SettingsDep, recommender: RecommenderDep,
                    rid: RequestIdDep) -> RecommendationResponse:
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


@router.post("/stream", response_class=EventStreamResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}},
                    "description": "events: reasoning {delta}*, items {items}, done {request_id, "
                                   "reasoning_tokens, latency_ms}; error {code, message} on failure"}},
    summary="Stream the model's reasoning, then the items (server-sent events)")
async def recommend_stream(body: StreamRecommendationRequest, settings: SettingsDep,
                           recommender: RecommenderDep, metrics: MetricsDep, rid: RequestIdDep) -> EventStreamResponse:
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
