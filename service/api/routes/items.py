"""Catalog lookups: one item by id, and search by title words (for pickers in UIs and for backends)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from model_store.bundle import Bundle
from service.api.deps import ApiError, BundleDep, SearchDep, require_api_key
from service.api.errors import error_responses
from service.api.schemas import ItemResponse, ItemSearchResponse

router = APIRouter(prefix="/v1/items", tags=["items"], dependencies=[Depends(require_api_key)])

MAX_SEARCH_LIMIT = 50


def item_response(bundle: Bundle, index: int) -> ItemResponse:
    item = bundle.items[index]
    return ItemResponse(item_id=item.item_id, title=item.title, brand=item.brand, categories=item.categories,
                        description=item.description, semantic_id=bundle.spelled_id(index),
                        codes=[int(c) for c in bundle.codes[index]], model_version=bundle.version)


@router.get("", response_model=ItemSearchResponse, responses=error_responses(401, 422, 503),
            summary="Search the catalog by title words (every word must match, whole or as a prefix)")
async def search_items(
        bundle: BundleDep, search: SearchDep,
        q: Annotated[str, Query(min_length=1, max_length=200,
                                description="title words, case- and accent-insensitive; each must match a "
                                            "title word whole or as its start (one-letter words whole only). "
                                            "Words are runs of letters, digits and '_'; a query without any "
                                            "matches nothing")],
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_LIMIT, description="most items to return")] = 10,
) -> ItemSearchResponse:
    found = search.search(q, limit)
    return ItemSearchResponse(query=q, total=found.total, items=[item_response(bundle, i) for i in found.indices])


# `:path` so catalog ids that contain '/' still resolve.
@router.get("/{item_id:path}", response_model=ItemResponse, responses=error_responses(401, 404, 503),
            summary="An item's metadata and semantic ID")
async def get_item(item_id: str, bundle: BundleDep) -> ItemResponse:
    index = bundle.index_of.get(item_id)
    if index is None:
        raise ApiError(404, "item_not_found", f"item_id {item_id!r} is not in the catalog",
                       errors=[{"field": "item_id", "message": "not in the catalog", "item_ids": [item_id]}])
    return item_response(bundle, index)
