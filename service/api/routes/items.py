"""Catalog lookups."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import ApiError, BundleDep, require_api_key
from service.api.routes.recommendations import ERRORS
from service.api.schemas import ItemResponse

router = APIRouter(prefix="/v1/items", tags=["items"], dependencies=[Depends(require_api_key)])


# `:path` so catalog ids that contain '/' still resolve.
@router.get("/{item_id:path}", response_model=ItemResponse, responses=ERRORS,
            summary="An item's metadata and semantic ID")
async def get_item(item_id: str, bundle: BundleDep) -> ItemResponse:
    index = bundle.index_of.get(item_id)
    if index is None:
        raise ApiError(404, "item_not_found", f"item_id {item_id!r} is not in the catalog",
                       errors=[{"field": "item_id", "message": "not in the catalog", "item_ids": [item_id]}])
    item = bundle.items[index]
    return ItemResponse(item_id=item.item_id, title=item.title, brand=item.brand, categories=item.categories,
                        description=item.description, semantic_id=bundle.spelled_id(index),
                        codes=[int(c) for c in bundle.codes[index]], model_version=bundle.version)
