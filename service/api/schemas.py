"""The public protocol: request and response bodies of the /v1 API (JSON; item ids are the catalog's
own string ids) and the payloads of the recommendation stream's server-sent events. Limits that
depend on settings (k, history length, reasoning tokens) are checked by `limit_errors`, so the 422
names the field and the configured bound. Numbers and booleans are strict: `"k": "5"` or
`"exclude_seen": 0` is a client bug, answered with a 422 naming the field."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

from service.config import Settings
from service.recommender import RecommendedItem

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# Visible ASCII only: user ids become Redis key suffixes and log fields.
USER_ID_PATTERN = r"^[!-~]{1,128}$"
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored


# ------------------------------------------------------------------ recommendations
class RecommendationRequest(_Strict):
    user_id: UserId | None = Field(None, description="whose cached history to use when `history` is absent")
    history: list[ItemId] | None = Field(None, description="item ids, oldest first; overrides the cache")
    k: StrictInt = Field(10, ge=1, description="number of items (1..max_k, a server setting, 100 by default)")
    exclude_seen: StrictBool = Field(True, description="never return items of the history")
    exclude_items: list[ItemId] = Field(default_factory=list)
    allow_items: list[ItemId] | None = Field(None, description="when set, only these items may be returned")

    def limit_errors(self, settings: Settings) -> list[tuple[str, str]]:
        errors = []
        if self.k > settings.max_k:
            errors.append(("k", f"must be <= {settings.max_k}, got {self.k}"))
        if self.history is not None and len(self.history) > settings.max_history:
            errors.append(("history", f"at most {settings.max_history} items, got {len(self.history)}"))
        for name in ("exclude_items", "allow_items"):
            ids = getattr(self, name)
            if ids is not None and len(ids) > settings.max_filter_items:
                errors.append((name, f"at most {settings.max_filter_items} items, got {len(ids)}"))
        return errors


class StreamRecommendationRequest(RecommendationRequest):
    max_reasoning_tokens: StrictInt | None = Field(None, ge=1,
                                                   description="reasoning budget (<= the server's max)")

    def limit_errors(self, settings: Settings) -> list[tuple[str, str]]:
        errors = super().limit_errors(settings)
        if self.max_reasoning_tokens is not None and self.max_reasoning_tokens > settings.max_reasoning_tokens:
            errors.append(("max_reasoning_tokens",
                           f"must be <= {settings.max_reasoning_tokens}, got {self.max_reasoning_tokens}"))
        return errors


class ItemOut(BaseModel):
    item_id: str
    title: str
    semantic_id: str = Field(description="the item's ID tokens, e.g. <a_3><b_17><c_5><d_0>")
    score: float | None = Field(description="summed raw log-probability of the ID tokens, plus strength * log "
                                            "p_prior(item) when the bundle's collaborative prior is fused; "
                                            "null for fallbacks")
    fallback: Literal["popular"] | None = None


def item_out(item: RecommendedItem) -> ItemOut:
    # model_construct: these values come from our own catalog and engine, validating them again is waste.
    return ItemOut.model_construct(item_id=item.item_id, title=item.title, semantic_id=item.semantic_id,
                                   score=item.score, fallback=item.fallback)


class RecommendationResponse(BaseModel):
    request_id: str
    model_version: str
    user_id: str | None
    items: list[ItemOut]
    history_used: int = Field(description="history items the prompt was built from")
    history_source: Literal["request", "cache", "none"]
    fallback: Literal["popular"] | None = None


# ------------------------------------------------------------------ users
class EventIn(_Strict):
    item_id: ItemId
    timestamp: datetime | float | None = Field(None, description="ISO 8601 or Unix seconds; orders the batch")


class EventsRequest(_Strict):
    events: list[EventIn] = Field(min_length=1)

    def limit_errors(self, settings: Settings) -> list[tuple[str, str]]:
        if len(self.events) > settings.max_history:
            return [("events", f"at most {settings.max_history} events per request, got {len(self.events)}")]
        return []

    def ordered_item_ids(self) -> list[str]:
        """Item ids oldest first: by timestamp when every event has one, else as sent."""
        if all(e.timestamp is not None for e in self.events):
            def key(e: EventIn) -> float:
                ts = e.timestamp
                return ts.timestamp() if isinstance(ts, datetime) else float(ts)  # type: ignore[arg-type]
            return [e.item_id for e in sorted(self.events, key=key)]
        return [e.item_id for e in self.events]


class EventsAccepted(BaseModel):
    user_id: str
    accepted: int
    history_length: int


class HistoryResponse(BaseModel):
    user_id: str
    items: list[str]
    history_length: int


# ------------------------------------------------------------------ items
class ItemResponse(BaseModel):
    item_id: str
    title: str
    brand: str
    categories: str
    description: str
    semantic_id: str
    codes: list[int]
    model_version: str


class ItemSearchResponse(BaseModel):
    query: str
    total: int = Field(description="items matching every word (the response holds at most `limit`)")
    items: list[ItemResponse] = Field(description="best first: whole-word matches, earlier in the title, "
                                                  "then more popular")


# ------------------------------------------------------------------ health
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "starting", "unavailable"]
    model_version: str | None
    bundle_loaded: bool
    engine: str | None
    engine_ready: bool
    history_store: str | None
    history_store_state: Literal["up", "down", "memory"] | None
    loaded_versions: list[str] = Field(default_factory=list, description="versions in memory: the served one, "
                                       "and during a swap the one being retired")
    loading_version: str | None = Field(None, description="a version being loaded and warmed, if any")
    refused_versions: dict[str, str] = Field(default_factory=dict, description="versions that failed to load, "
                                             "with the reason; the served version went on")


class ReloadResult(BaseModel):
    outcome: Literal["swapped", "unchanged", "refused", "pending"]
    model_version: str | None = Field(description="the version served after the reload")
    previous: str | None = None
    error: str | None = None


# ------------------------------------------------------------------ errors
class FieldError(BaseModel):
    field: str
    message: str
    item_ids: list[str] | None = None


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_request, unknown_items, overloaded")
    message: str
    request_id: str | None = None
    errors: list[FieldError] | None = None


# ------------------------------------------------------------------ stream events
# Each is the JSON `data` of one server-sent event; the event's name says which.
class ReasoningEvent(BaseModel):
    """`event: reasoning`: the next piece of the model's reasoning text (zero or more, first)."""

    delta: str


class ItemsEvent(BaseModel):
    """`event: items`: the recommended items, once, after the reasoning."""

    items: list[ItemOut]


class SectionCitations(BaseModel):
    """The history items one section of the reasoning names (by title, brand or theme, or by ID)."""

    section: Literal["evidence", "preference", "intent", "recommendation", "rewrite"]
    item_ids: list[str] = Field(description="ids of history items, in the order the section names them")


class DoneEvent(BaseModel):
    """`event: done`: the last event of a stream that succeeded."""

    request_id: str
    reasoning_tokens: int
    latency_ms: float
    finish_reason: Literal["end_of_thinking", "length"] | None = Field(
        None, description="end_of_thinking: the reasoning closed itself within its budget; length: the budget "
                          "ran out first; null when the stream answered without reasoning (popular fallback)")
    citations: list[SectionCitations] = Field(
        default_factory=list, description="per section of the reasoning, the history items it cites")


class ErrorEvent(BaseModel):
    """`event: error`: the stream failed after it started; the last event."""

    code: Literal["overloaded", "engine_unavailable", "internal_error"]
    message: str


STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "reasoning": ReasoningEvent, "items": ItemsEvent, "done": DoneEvent, "error": ErrorEvent}
