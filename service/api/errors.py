"""Errors over HTTP: every one is a JSON `ErrorBody` ({code, message, request_id, errors}). The
handlers render the exceptions the routes and the layers below them raise; `error_responses`
documents, per route, each status it can answer."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.api.deps import ApiError
from service.api.schemas import ErrorBody
from service.engine.base import EngineOverloaded, EngineUnavailable
from service.history import HistoryUnavailable
from service.recommender import UnknownItems

log = logging.getLogger("gream")

_MEANING = {
    400: "the body is not JSON (or not UTF-8)",
    401: "missing or invalid API key (when API keys are configured)",
    404: "the item is not in the catalog",
    413: "the body is larger than the limit",
    422: "an invalid field, a limit exceeded or unknown item ids; `errors` names each field",
    429: "the engine's queue is full (see Retry-After)",
    503: "still starting, or the history store or the engine is unavailable (see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the ErrorBody schema."""
    return {status: {"model": ErrorBody, "description": _MEANING[status]} for status in statuses}


def json_error(status: int, code: str, message: str, rid: str | None, errors: list[dict[str, Any]] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": rid}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path answers, over all routes: GET and DELETE of one path are two
    routes, and Starlette's own 405 names only the first route's methods."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:  # PARTIAL: path only
            methods |= route_methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return json_error(exc.status, exc.code, exc.message, _rid(request), exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(err.get("type") == "json_invalid" for err in problems):
            detail = "; ".join(str((err.get("ctx") or {}).get("error", err.get("msg"))) for err in problems)
            return json_error(400, "invalid_json", f"body: not valid JSON ({detail})", _rid(request),
                              [{"field": "body", "message": f"not valid JSON ({detail})"}])
        errors = []
        for err in problems:
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid")})
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return json_error(422, "invalid_request", message, _rid(request), errors)

    @app.exception_handler(UnknownItems)
    async def unknown_items(request: Request, exc: UnknownItems) -> JSONResponse:
        errors = [{"field": f, "message": f"{len(ids)} unknown item id(s)", "item_ids": ids}
                  for f, ids in exc.unknown.items()]
        return json_error(422, "unknown_items", str(exc), _rid(request), errors)

    @app.exception_handler(HistoryUnavailable)
    async def store_down(request: Request, exc: HistoryUnavailable) -> JSONResponse:
        return json_error(503, "history_unavailable", f"{exc}. Requests that send 'history' in the body still work.",
                          _rid(request), headers={"Retry-After": "5"})

    @app.exception_handler(EngineOverloaded)
    async def overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        request.app.state.metrics.engine_rejected.labels("overloaded").inc()
        retry = str(max(1, int(-(-exc.retry_after // 1))))
        return json_error(429, "overloaded", f"{exc}; retry after {retry} s", _rid(request),
                          headers={"Retry-After": retry})

    @app.exception_handler(EngineUnavailable)
    async def engine_down(request: Request, exc: EngineUnavailable) -> JSONResponse:
        request.app.state.metrics.engine_rejected.labels("unavailable").inc()
        return json_error(503, "engine_unavailable", str(exc), _rid(request), headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return json_error(exc.status_code, code, str(exc.detail), _rid(request), headers=headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return json_error(500, "internal_error", "internal error; see the server log for this request id",
                          _rid(request))
