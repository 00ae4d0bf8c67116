"""History -> prompt -> engine -> items: the serving logic, free of HTTP.

This is the one place that turns a request's exclusions and allow-lists into item-index sets for the
engine, which enforces them inside the decoding (the trie), so k valid items still come back when
some are excluded. Prompts come only from model_store.tokens templates, exactly as in training.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Literal

from model_store.bundle import Bundle
from model_store.grounding import GroundingIndex, cite_sections
from model_store.tokens import direct_prompt, reasoning_prompt, truncate_history
from service.engine.base import Engine, EngineRequest, ReasoningDelta, ReasoningDone, ScoredItem
from service.history import HistoryStore
from service.metrics import Metrics

HistorySource = Literal["request", "cache", "none"]


class UnknownItems(ValueError):
    """Item ids that are not in the served catalog, per request field."""

    def __init__(self, unknown: dict[str, list[str]]):
        self.unknown = unknown
        parts = [f"{name}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}" for name, ids in unknown.items()]
        super().__init__("unknown item ids in " + "; ".join(parts))


@dataclass(frozen=True)
class Query:
    user_id: str | None = None
    history: Sequence[str] | None = None  # None: use the user's cached history
    k: int = 10
    exclude_seen: bool = True
    exclude_items: Sequence[str] = ()
    allow_items: Sequence[str] | None = None


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    title: str
    semantic_id: str
    score: float | None
    fallback: str | None = None


@dataclass
class Result:
    request_id: str
    model_version: str
    user_id: str | None
    items: list[RecommendedItem]
    history_used: int
    history_source: HistorySource
    fallback: str | None = None
    reasoning_tokens: int = 0
    latency_ms: float = 0.0
    finish_reason: str | None = None  # streams with reasoning: "end_of_thinking" or "length"
    # (section, ids of the history items it names), one per section of the reasoning.
    citations: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class Plan:
    """A validated request, ready for the engine (or for the popular fallback when it has no history)."""

    request_id: str
    query: Query
    history: list[int]  # item indices, oldest first, as used in the prompt
    source: HistorySource
    exclude: frozenset[int]
    allow: frozenset[int] | None
    started: float = field(default_factory=time.perf_counter)

    @property
    def fallback(self) -> bool:
        return not self.history


@dataclass(frozen=True)
class StreamDone:
    result: Result


class Recommender:
    def __init__(self, bundle: Bundle, engine: Engine, store: HistoryStore, *, history_cap: int = 50,
                 drop_chunk: int = 10, metrics: Metrics | None = None, use_prior: bool = True,
                 reasoning_answer: str = "history"):
        self.bundle = bundle
        if reasoning_answer not in ("history", "chain"):
            raise ValueError(f"reasoning_answer must be 'history' or 'chain', got {reasoning_answer!r}")
        # "history": a stream's items are direct mode's, ranked from the history; the chain explains
        # them. "chain": ranked after the chain, as GREAM conditions its answer.
        self.reasoning_answer = reasoning_answer
        self.use_prior = use_prior  # send the history so the engine fuses the bundle's collaborative prior
        # Prompts hold at most the window the model was trained on (and evaluated with): longer prompts
        # put items at positions it never learned.
        self.prompt_window = bundle.prompt_history
        self.engine = engine
        self.store = store
        self.history_cap = history_cap
        self.drop_chunk = drop_chunk
        self.metrics = metrics
        # One recommender serves one version: its counters are bound once, not looked up per request.
        self._served = {mode: metrics.served.labels(bundle.version, mode) for mode in ("direct", "reasoning")
                        } if metrics is not None else {}
        self._grounding: GroundingIndex | None = None  # built on the first stream (item themes)

    # ------------------------------------------------------------------ validation
    def indices(self, field_ids: dict[str, Sequence[str] | None]) -> dict[str, list[int]]:
        """Item indices per field; raises UnknownItems naming every unknown id of every field."""
        out: dict[str, list[int]] = {}
        unknown: dict[str, list[str]] = {}
        for name, ids in field_ids.items():
            if ids is None:
                continue
            missing = [i for i in dict.fromkeys(ids) if i not in self.bundle.index_of]
            if missing:
                unknown[name] = missing
            else:
                out[name] = [self.bundle.index_of[i] for i in ids]
        if unknown:
            raise UnknownItems(unknown)
        return out

    # ------------------------------------------------------------------ planning
    async def plan(self, query: Query, request_id: str) -> Plan:
        resolved = self.indices({"history": query.history, "exclude_items": query.exclude_items,
                                 "allow_items": query.allow_items})
        if query.history is not None:
            full, source = resolved["history"], "request"
        elif query.user_id is not None:
            cached = await self.store.get(query.user_id)  # HistoryUnavailable -> 503 upstream
            # Items dropped from the catalog since they were recorded (a new model version may lack
            # them) are skipped and counted, not an error.
            full = [self.bundle.index_of[i] for i in cached if i in self.bundle.index_of]
            source = "cache" if full else "none"
            if self.metrics is not None:
                self.metrics.history_cache.labels("hit" if full else "miss").inc()
                if len(full) < len(cached):
                    self.metrics.history_items_dropped.inc(len(cached) - len(full))
        else:
            full, source = [], "none"
        exclude = set(resolved.get("exclude_items", ()))
        if query.exclude_seen:
            exclude.update(full)
        allow = frozenset(resolved["allow_items"]) if query.allow_items is not None else None
        used = truncate_history(full, self.history_cap, self.drop_chunk)
        if self.prompt_window is not None and len(used) > self.prompt_window:
            used = used[-self.prompt_window:]
        return Plan(request_id, query, used, source, frozenset(exclude), allow)  # type: ignore[arg-type]

    def engine_request(self, plan: Plan, reasoning: bool = False) -> EngineRequest:
        spelled = [self.bundle.spelled_id(i) for i in plan.history]
        prompt = reasoning_prompt(spelled) if reasoning else direct_prompt(spelled)
        answer = direct_prompt(spelled) if reasoning and self.reasoning_answer == "history" else None
        return EngineRequest(request_id=plan.request_id, prompt=prompt, k=plan.query.k,
                             exclude=plan.exclude, allow=plan.allow,
                             history=tuple(plan.history) if self.use_prior else None, answer_prompt=answer)

    # ------------------------------------------------------------------ answers
    async def recommend(self, query: Query, request_id: str) -> Result:
        plan = await self.plan(query, request_id)
        if plan.fallback or self._nothing_allowed(plan):
            return self._finish(plan, self._popular(plan))
        scored = await self.engine.recommend(self.engine_request(plan))
        if self.metrics is not None:
            self._served["direct"].inc()
        return self._finish(plan, self._describe(scored))

    async def stream(self, plan: Plan, max_reasoning_tokens: int
                     ) -> AsyncIterator[ReasoningDelta | StreamDone]:
        """Reasoning deltas, then the items. Closing this iterator closes the engine's (aborting it)."""
        if plan.fallback or self._nothing_allowed(plan):
            yield StreamDone(self._finish(plan, self._popular(plan)))
            return
        first_delta = True
        text: list[str] = []
        events = self.engine.reason(self.engine_request(plan, reasoning=True), max_reasoning_tokens)
        async with aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, ReasoningDelta):
                    if first_delta and self.metrics is not None:
                        self.metrics.first_reasoning_token.observe(time.perf_counter() - plan.started)
                    first_delta = False
                    text.append(event.text)
                    yield event
                elif isinstance(event, ReasoningDone):
                    if self.metrics is not None:
                        self.metrics.reasoning_tokens.observe(event.reasoning_tokens)
                        self._served["reasoning"].inc()
                    result = self._finish(plan, self._describe(event.items))
                    result.reasoning_tokens = event.reasoning_tokens
                    result.finish_reason = event.finish_reason
                    result.citations = self.citations("".join(text), plan.history)
                    yield StreamDone(result)

    # ------------------------------------------------------------------ helpers
    def citations(self, reasoning: str, history: Sequence[int]) -> list[tuple[str, list[str]]]:
        """Which history items each section of the reasoning names (for "because you bought X")."""
        if self._grounding is None:
            self._grounding = GroundingIndex(self.bundle)
        return cite_sections(reasoning, self._grounding.names_of(history))

    def _nothing_allowed(self, plan: Plan) -> bool:
        return plan.allow is not None and not (plan.allow - plan.exclude)

    def _popular(self, plan: Plan) -> list[RecommendedItem]:
        if plan.allow is not None:
            pool = sorted(plan.allow - plan.exclude, key=lambda i: (-float(self.bundle.popularity[i]), i))
            chosen = pool[: plan.query.k]
        else:
            chosen = self.bundle.popular(plan.query.k, exclude=plan.exclude)
        return [self._item(i, None, fallback="popular") for i in chosen]

    def _describe(self, scored: Sequence[ScoredItem]) -> list[RecommendedItem]:
        return [self._item(s.index, s.score) for s in scored]

    def _item(self, index: int, score: float | None, fallback: str | None = None) -> RecommendedItem:
        item = self.bundle.items[index]
        return RecommendedItem(item_id=item.item_id, title=item.title, semantic_id=self.bundle.spelled_id(index),
                               score=None if score is None else round(float(score), 6), fallback=fallback)

    def _finish(self, plan: Plan, items: list[RecommendedItem]) -> Result:
        fallback = "popular" if items and items[0].fallback else None
        if self.metrics is not None:
            self.metrics.items_returned.labels(fallback or "model").observe(len(items))
        return Result(request_id=plan.request_id, model_version=self.bundle.version, user_id=plan.query.user_id,
                      items=items, history_used=len(plan.history), history_source=plan.source, fallback=fallback,
                      latency_ms=round((time.perf_counter() - plan.started) * 1000, 3))
