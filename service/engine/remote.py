"""Engines in other processes: the gateway-side `RemoteEngine` and the worker-side routes it calls.

A gateway started with `--engine-url` (one or more) runs no model: it validates, builds prompts and
forwards `EngineRequest`s to workers round robin, failing over to the next worker on connection
errors. A worker is an ordinary `gream serve` with `engine_worker` on, which mounts:

    POST /internal/engine/topk     EngineRequest JSON -> {"items": [{"index", "score"}]}
    POST /internal/engine/reason   EngineRequest JSON + max_reasoning_tokens -> NDJSON lines
                                   {"delta": str}* then {"items": [...], "reasoning_tokens": n}
                                   (or {"error": {"code", "message"}})
    GET  /readyz                   (the app's own) to learn each worker's state and model version

Gateway and workers must serve the same bundle version: item indices travel, not item ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from service.engine.base import (
    Engine,
    EngineOverloaded,
    EngineRequest,
    EngineStats,
    EngineUnavailable,
    ReasoningDelta,
    ReasoningDone,
    ScoredItem,
)

log = logging.getLogger("gream.engine.remote")

_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


# ------------------------------------------------------------------ wire format
class WireRequest(BaseModel):
    request_id: str
    prompt: str
    k: int = Field(ge=1)
    exclude: list[int] = Field(default_factory=list)
    allow: list[int] | None = None
    num_beams: int | None = None
    history: list[int] | None = None  # item indices, for the bundle's collaborative prior
    max_reasoning_tokens: int | None = Field(None, ge=1)

    @classmethod
    def of(cls, request: EngineRequest, max_reasoning_tokens: int | None = None) -> WireRequest:
        return cls(request_id=request.request_id, prompt=request.prompt, k=request.k,
                   exclude=sorted(request.exclude), allow=None if request.allow is None else sorted(request.allow),
                   num_beams=request.num_beams, max_reasoning_tokens=max_reasoning_tokens,
                   history=None if request.history is None else list(request.history))

    def engine_request(self) -> EngineRequest:
        return EngineRequest(request_id=self.request_id, prompt=self.prompt, k=self.k,
                             exclude=frozenset(self.exclude),
                             allow=None if self.allow is None else frozenset(self.allow), num_beams=self.num_beams,
                             history=None if self.history is None else tuple(self.history))


def _items(raw: Sequence[dict[str, Any]]) -> list[ScoredItem]:
    return [ScoredItem(index=int(r["index"]), score=float(r["score"])) for r in raw]


def _wire_items(items: Sequence[ScoredItem]) -> list[dict[str, Any]]:
    return [{"index": i.index, "score": i.score} for i in items]


# ------------------------------------------------------------------ gateway side
class RemoteEngine(Engine):
    name = "remote"

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 30.0, api_key: str | None = None,
                 expected_version: str | None = None, health_interval_s: float = 5.0):
        if not urls:
            raise ValueError("RemoteEngine needs at least one worker URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.expected_version = expected_version
        self.health_interval_s = health_interval_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=2.0),
                                         limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self._rr = itertools.count()
        self._up: dict[str, bool] = dict.fromkeys(self.urls, False)
        self._in_flight = 0
        self._health: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.check_workers()
        if not any(self._up.values()):
            log.warning("no engine worker is reachable yet; will keep trying", extra={"urls": self.urls})
        self._health = asyncio.create_task(self._health_loop(), name="gream-remote-health")

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            try:
                await self._health
            except asyncio.CancelledError:
                pass
        await self._client.aclose()

    @property
    def ready(self) -> bool:
        return any(self._up.values())

    def stats(self) -> EngineStats:
        return EngineStats(queue_depth=0, running=self._in_flight,
                           extra={"workers_up": float(sum(self._up.values())), "workers": float(len(self.urls))})

    async def check_workers(self) -> None:
        for url in self.urls:
            self._up[url] = await self._probe(url)

    async def _probe(self, url: str) -> bool:
        try:
            resp = await self._client.get(f"{url}/readyz", timeout=2.0)
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            return False
        if self.expected_version and body.get("model_version") != self.expected_version:
            log.error("engine worker serves another bundle version; not using it",
                      extra={"url": url, "worker_version": body.get("model_version"),
                             "expected": self.expected_version})
            return False
        return resp.status_code == 200 and bool(body.get("engine_ready"))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_workers()

    def _order(self) -> list[str]:
        """Round robin start, workers believed up first, the others as a last resort."""
        start = next(self._rr) % len(self.urls)
        rotated = self.urls[start:] + self.urls[:start]
        return [u for u in rotated if self._up[u]] + [u for u in rotated if not self._up[u]]

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code == 429:
            raise EngineOverloaded("engine worker is overloaded",
                                   retry_after=float(resp.headers.get("retry-after", "1")))
        if resp.status_code >= 400:
            raise EngineUnavailable(f"engine worker answered {resp.status_code}: {resp.text[:200]}")

    async def recommend(self, request: EngineRequest) -> list[ScoredItem]:
        payload = WireRequest.of(request).model_dump()
        self._in_flight += 1
        try:
            for url in self._order():
                try:
                    resp = await self._client.post(f"{url}/internal/engine/topk", json=payload,
                                                   headers={"X-Request-Id": request.request_id})
                except _CONNECT_ERRORS:
                    self._up[url] = False
                    continue
                if resp.status_code == 503:  # that worker is not ready: try another
                    self._up[url] = False
                    continue
                self._up[url] = True
                self._raise_for(resp)
                return _items(resp.json()["items"])
        finally:
            self._in_flight -= 1
        raise EngineUnavailable(f"no engine worker reachable ({', '.join(self.urls)})")

    async def reason(self, request: EngineRequest, max_reasoning_tokens: int
                     ) -> AsyncIterator[ReasoningDelta | ReasoningDone]:
        payload = WireRequest.of(request, max_reasoning_tokens).model_dump()
        self._in_flight += 1
        try:
            for url in self._order():
                try:
                    # Leaving this block (consumer closed us) closes the connection, which makes the
                    # worker's stream see a disconnect and abort its generation.
                    async with self._client.stream("POST", f"{url}/internal/engine/reason", json=payload,
                                                   headers={"X-Request-Id": request.request_id}) as resp:
                        if resp.status_code == 503:
                            self._up[url] = False
                            continue
                        self._up[url] = True
                        if resp.status_code >= 400:
                            await resp.aread()
                            self._raise_for(resp)
                        async for line in resp.aiter_lines():
                            if not line.strip():
                                continue
                            msg = json.loads(line)
                            if "delta" in msg:
                                yield ReasoningDelta(msg["delta"])
                            elif "items" in msg:
                                yield ReasoningDone(_items(msg["items"]), int(msg["reasoning_tokens"]))
                                return
                            elif "error" in msg:
                                err = msg["error"]
                                if err.get("code") == "overloaded":
                                    raise EngineOverloaded(err.get("message", "engine worker overloaded"))
                                raise EngineUnavailable(f"engine worker failed: {err.get('message')}")
                        raise EngineUnavailable("engine worker closed the stream early")
                except _CONNECT_ERRORS:
                    # Safe to fail over only before anything was streamed, i.e. on connect.
                    self._up[url] = False
                    continue
        finally:
            self._in_flight -= 1
        raise EngineUnavailable(f"no engine worker reachable ({', '.join(self.urls)})")


# ------------------------------------------------------------------ worker side
def worker_router(dependencies: Sequence[Any] = ()) -> APIRouter:
    """Routes through which gateways use this process's engine (`request.app.state.engine`)."""
    router = APIRouter(prefix="/internal/engine", tags=["internal"], include_in_schema=False,
                       dependencies=[Depends(d) for d in dependencies])

    def engine_of(request: Request) -> Engine:
        engine = getattr(request.app.state, "engine", None)
        if engine is None or not engine.ready:
            raise EngineUnavailable("engine is not ready")
        return engine  # type: ignore[no-any-return]

    @router.post("/topk")
    async def topk(body: WireRequest, request: Request) -> JSONResponse:
        items = await engine_of(request).recommend(body.engine_request())
        return JSONResponse({"items": _wire_items(items)})

    @router.post("/reason")
    async def reason(body: WireRequest, request: Request) -> StreamingResponse:
        engine = engine_of(request)
        from service.api.routes.recommendations import EventStreamResponse

        async def lines() -> AsyncIterator[str]:
            events = engine.reason(body.engine_request(), body.max_reasoning_tokens or 256)
            try:
                async for event in events:
                    if isinstance(event, ReasoningDelta):
                        yield json.dumps({"delta": event.text}) + "\n"
                    else:
                        yield json.dumps({"items": _wire_items(event.items),
                                          "reasoning_tokens": event.reasoning_tokens}) + "\n"
            except EngineOverloaded as exc:
                yield json.dumps({"error": {"code": "overloaded", "message": str(exc)}}) + "\n"
            except Exception as exc:  # the stream has started: report in-band
                log.exception("engine worker stream failed")
                yield json.dumps({"error": {"code": "engine_error", "message": str(exc)}}) + "\n"
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        return EventStreamResponse(lines(), media_type="application/x-ndjson")

    return router
