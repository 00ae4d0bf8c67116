"""Catalog lookups: one item by id, and search by title words (for pickers in UIs and for backends)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from model_store.bundle import Bundle
from service.api.deps import ApiError, BundleDep, SearchDep, field_errors, require_api_key
from service.api.routes.recommendations import ERRORS
from service.api.schemas import ItemResponse, ItemSearchResponse
from service.search import words

router = APIRouter(prefix="/v1/items", tags=["items"], dependencies=[Depends(require_api_key)])

MAX_SEARCH_LIMIT = 50


def item_response(bundle: Bundle, index: int) -> ItemResponse:
    item = bundle.items[index]
    return ItemResponse(item_id=item.item_id, title=item.title, brand=item.brand, categories=item.categories,
                        description=item.description, semantic_id=bundle.spelled_id(index),
                        codes=[int(c) for c in bundle.codes[index]], model_version=bundle.version)


@router.get("", response_model=ItemSearchResponse, responses=ERRORS,
            summary="Search the catalog by title words (every word must match, whole or as a prefix)")
async def search_items(
        bundle: BundleDep, search: SearchDep,
        q: Annotated[str, Query(min_length=1, max_length=200,
                                description="title words, case- and accent-insensitive; each must match a "
                                            "title word whole or as its start (one-letter words whole only)")],
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_LIMIT, description="most items to return")] = 10,
) -> ItemSearchResponse:
    if not words(q):
        raise field_errors([("query.q", "must contain at least one letter or digit")])
    found = search.search(q, limit)
    return ItemSearchResponse(query=q, total=found.total, items=[item_response(bundle, i) for i in found.indices])


# `:path` so catalog ids that contain '/' still resolve.
@router.get("/{item_id:path}", response_model=ItemResponse, responses=ERRORS,
            summary="An item's metadata and semantic ID")
async def get_item(item_id: str, bundle: BundleDep) -> ItemResponse:
    index = bundle.index_of.get(item_id)
    if index is None:
        raise ApiError(404, "item_not_found", f"item_id {item_id!r} is not in the catalog",
                       errors=[{"field": "item_id", "message": "not in the catalog", "item_ids": [item_id]}])
    return item_response(bundle, index)
