"""User interaction events and cached histories."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from service.api.deps import RecommenderDep, SettingsDep, StoreDep, field_errors, require_api_key
from service.api.errors import error_responses
from service.api.schemas import USER_ID_PATTERN, EventsAccepted, EventsRequest, HistoryResponse

router = APIRouter(prefix="/v1/users", tags=["users"], dependencies=[Depends(require_api_key)])

UserPath = Annotated[str, Path(pattern=USER_ID_PATTERN, description="visible ASCII, at most 128 characters")]


@router.post("/{user_id}/events", status_code=202, response_model=EventsAccepted,
             responses=error_responses(400, 401, 413, 422, 503),
             summary="Append interactions to the user's history (acknowledged only once written)")
async def add_events(user_id: UserPath, body: EventsRequest, settings: SettingsDep, store: StoreDep,
                     recommender: RecommenderDep) -> EventsAccepted:
    problems = body.limit_errors(settings)
    if problems:
        raise field_errors(problems)
    item_ids = body.ordered_item_ids()
    recommender.indices({"events": item_ids})  # unknown ids -> 422 naming them
    length = await store.append(user_id, item_ids)  # store down -> 503, never a false 202
    return EventsAccepted(user_id=user_id, accepted=len(item_ids), history_length=length)


@router.get("/{user_id}/history", response_model=HistoryResponse, responses=error_responses(401, 422, 503),
            summary="The user's cached history, oldest first")
async def get_history(user_id: UserPath, store: StoreDep) -> HistoryResponse:
    items = await store.get(user_id)
    return HistoryResponse(user_id=user_id, items=items, history_length=len(items))


@router.delete("/{user_id}/history", status_code=204, responses=error_responses(401, 422, 503),
               summary="Forget the user's history")
async def delete_history(user_id: UserPath, store: StoreDep) -> Response:
    await store.delete(user_id)
    return Response(status_code=204)
