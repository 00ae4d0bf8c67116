"""POST /v1/recommendations and its streaming twins (server-sent events: service/api/streaming.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import ValidationError
from starlette.responses import Response

from service.api.deps import (
    MetricsDep,
    RecommenderDep,
    RequestIdDep,
    SettingsDep,
    field_errors,
    require_api_key,
    require_api_key_or_query,
)
from service.api.errors import error_responses
from service.api.schemas import (
    USER_ID_PATTERN,
    RecommendationRequest,
    RecommendationResponse,
    StreamRecommendationRequest,
    item_out,
)
from service.api.streaming import STREAM_OK, open_stream
from service.recommender import Query as RecQuery
from service.recommender import Result

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"],
                   dependencies=[Depends(require_api_key)])
# GET /v1/recommendations/stream, for the browser's EventSource: the only route that also takes the API key
# as a query parameter, since EventSource can neither POST nor set headers.
eventsource_router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"],
                               dependencies=[Depends(require_api_key_or_query)])

POST_ERRORS = error_responses(400, 401, 413, 422, 429, 503)
QUERY_ERRORS = error_responses(401, 422, 429, 503)


def to_query(body: RecommendationRequest) -> RecQuery:
    return RecQuery(user_id=body.user_id, history=body.history, k=body.k, exclude_seen=body.exclude_seen,
                    exclude_items=body.exclude_items, allow_items=body.allow_items)


class PreSerialized(Response):
    media_type = "application/json"


def to_response(result: Result) -> PreSerialized:
    """The response body, serialised once by pydantic's Rust core. Returning a Response keeps FastAPI
    from validating and re-encoding our own output (`response_model` still documents the schema)."""
    body = RecommendationResponse.model_construct(
        request_id=result.request_id, model_version=result.model_version, user_id=result.user_id,
        items=[item_out(i) for i in result.items], history_used=result.history_used,
        history_source=result.history_source, fallback=result.fallback)
    return PreSerialized(body.model_dump_json())


@router.post("", response_model=RecommendationResponse, responses=POST_ERRORS,
             summary="Top-k next items for a history (the request's, else the user's cached one)")
async def recommend(body: RecommendationRequest, settings: SettingsDep, recommender: RecommenderDep,
                    rid: RequestIdDep) -> Response:
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors(problems)
    return to_response(await recommender.recommend(to_query(body), rid))


# ------------------------------------------------------------------ streaming
# `response_class=Response` (no media type of its own): the 200 is documented as text/event-stream by
# STREAM_OK and the errors as JSON; the routes return sse-starlette's EventSourceResponse.
@router.post("/stream", response_class=Response, responses={**STREAM_OK, **POST_ERRORS},
             summary="Stream the model's reasoning, then the items (server-sent events)")
async def recommend_stream(body: StreamRecommendationRequest, settings: SettingsDep,
                           recommender: RecommenderDep, metrics: MetricsDep, rid: RequestIdDep) -> Response:
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors(problems)
    return await open_stream(to_query(body), body.max_reasoning_tokens or settings.reasoning_budget_default,
                             recommender, metrics, rid)


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
    "/stream", response_class=Response, responses={**STREAM_OK, **QUERY_ERRORS},
    summary="The stream for EventSource clients: the same events, the request as query parameters",
    description="`history` may be repeated (`history=a&history=b`) or comma-separated (`history=a,b`); "
                "`history=` (empty) means an empty history. When API keys are configured, the key may be sent "
                "as `api_key` (this route only; it is never logged). EventSource reconnects when a stream "
                "ends, so close it on `done` or `error`; its own connection failures also arrive as `error` "
                "events, without `data`.")
async def recommend_stream_get(
        settings: SettingsDep, recommender: RecommenderDep, metrics: MetricsDep, rid: RequestIdDep,
        user_id: Annotated[str | None, Query(pattern=USER_ID_PATTERN,
                                             description="whose cached history to use when `history` is absent; "
                                                         "visible ASCII, at most 128 characters")] = None,
        history: Annotated[list[str] | None, Query(description="item ids, oldest first, each at most 256 "
                                                                    "characters; overrides the cache")] = None,
        k: Annotated[int, Query(ge=1, description="number of items (1..max_k, a server setting, 100 by default)")
                     ] = 10,
        exclude_seen: Annotated[bool, Query(description="never return items of the history")] = True,
        max_reasoning_tokens: Annotated[int | None, Query(ge=1, description="reasoning budget")] = None,
) -> Response:
    fields: dict[str, Any] = {"user_id": user_id, "history": split_ids(history, recommender.bundle.index_of),
                              "k": k, "exclude_seen": exclude_seen, "max_reasoning_tokens": max_reasoning_tokens}
    try:
        body = StreamRecommendationRequest(**fields)
    except ValidationError as exc:
        raise field_errors([("query." + str(err["loc"][0]) if err.get("loc") else "query", err["msg"])
                            for err in exc.errors()]) from None
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors([("query." + name, message) for name, message in problems])
    return await open_stream(to_query(body), body.max_reasoning_tokens or settings.reasoning_budget_default,
                             recommender, metrics, rid)
