"""Admin routes: ask a gateway that follows a registry to reload now (service.rollout)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request

from service.api.deps import ApiError
from service.api.schemas import ErrorBody, ReloadResult

router = APIRouter(prefix="/admin", tags=["admin"])


def _require_admin(request: Request) -> None:
    key: str | None = request.app.state.settings.admin_api_key
    if not key:
        raise ApiError(403, "admin_disabled", "admin routes are off; set GREAM_ADMIN_API_KEY to use them")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "unauthorized", "send the admin key as 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})


@router.post("/reload", response_model=ReloadResult, summary="Load the registry's current version now",
             responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def reload(request: Request) -> ReloadResult:
    """Reads the registry's `current` pointer and swaps to it if it moved; a version refused before
    is tried again. Answers once the swap is done (or refused)."""
    _require_admin(request)
    watcher = request.app.state.watcher
    if watcher is None:
        raise ApiError(409, "no_registry", "this gateway serves a bundle folder; start it with --registry ROOT "
                       "to follow a registry")
    return ReloadResult(**await watcher.check(retry_refused=True))
