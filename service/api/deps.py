"""FastAPI dependencies: the app's shared objects, the request id, bearer auth, and the HTTP error type
every route raises (rendered as `{code, message, request_id, errors}` by the app's handlers)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from model_store.bundle import Bundle
from service.config import Settings
from service.engine.base import Engine
from service.history import HistoryStore
from service.metrics import Metrics
from service.recommender import Recommender
from service.rollout import Deployment, ModelHost
from service.search import TitleIndex


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = headers or {}


def field_errors(problems: Sequence[tuple[str, str]]) -> ApiError:
    """One 422 naming every offending field."""
    return ApiError(422, "invalid_request", "; ".join(f"{f}: {m}" for f, m in problems),
                    errors=[{"field": f, "message": m} for f, m in problems])


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, and
# several thread hops per request contend for the GIL with the engine's worker thread under load.


async def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def _state(request: Request, name: str) -> Any:
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ApiError(503, "not_ready", "the service is still starting (bundle or engine not loaded)",
                       headers={"Retry-After": "2"})
    return value


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_deployment(request: Request) -> AsyncIterator[Deployment]:
    """The model version serving this request, leased until the response is sent (the stream
    included), so a live swap never changes the model under a request (service.rollout)."""
    host: ModelHost = _state(request, "host")
    if host.current is None:
        raise ApiError(503, "not_ready", "no model version is loaded", headers={"Retry-After": "2"})
    async with host.lease() as deployment:
        yield deployment


DeploymentDep = Annotated[Deployment, Depends(get_deployment)]


async def get_bundle(deployment: DeploymentDep) -> Bundle:
    return deployment.bundle


async def get_engine(deployment: DeploymentDep) -> Engine:
    return deployment.engine


async def get_store(request: Request) -> HistoryStore:
    return _state(request, "history")  # type: ignore[no-any-return]


async def get_recommender(deployment: DeploymentDep) -> Recommender:
    return deployment.recommender


async def get_search(deployment: DeploymentDep) -> TitleIndex:
    return deployment.search


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request) -> None:
    """Bearer auth when keys are configured; every key is compared in constant time."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    _check_key(keys, token)


async def require_api_key_or_query(
        request: Request,
        api_key: Annotated[str | None, Query(description="the API key, for clients that cannot set headers "
                                                         "(the browser's EventSource); prefer the "
                                                         "Authorization header; never logged")] = None) -> None:
    """Bearer auth that also accepts `?api_key=`, for the GET stream route only (EventSource can
    neither POST nor set headers). The header wins when both are sent. The gateway's access log
    records the path without the query string, so the key is never logged."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    token = _bearer(request) or (api_key.strip() if api_key and api_key.strip() else None)
    if token is None:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>' or, for "
                       "EventSource clients, the api_key query parameter", headers={"WWW-Authenticate": "Bearer"})
    _check_key(keys, token)


def _check_key(keys: list[str], token: str) -> None:
    supplied = token.encode()
    # No short-circuit: the time taken does not reveal which key (if any) almost matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key.encode())
    if not matched:
        raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[Settings, Depends(get_settings)]
BundleDep = Annotated[Bundle, Depends(get_bundle)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SearchDep = Annotated[TitleIndex, Depends(get_search)]
RequestIdDep = Annotated[str, Depends(request_id)]
