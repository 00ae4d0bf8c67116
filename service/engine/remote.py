"""Engines in other processes: the gateway-side `RemoteEngine`, a client of engine workers.

A gateway started with `--engine-url` (one or more) runs no model: it validates, builds prompts and
forwards `EngineRequest`s to workers round robin, failing over to the next worker on connection
errors. A worker is an ordinary `gream serve` with `expose_engine_api` on (`--expose-engine-api`), which mounts
(service/api/routes/worker.py, wire format in service/engine/wire.py):

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
from collections.abc import AsyncIterator

import httpx

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
from service.engine.config import RemoteEngineConfig
from service.engine.wire import WireRequest, items_from_wire

log = logging.getLogger("gream.engine.remote")

_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


# ------------------------------------------------------------------ gateway side
class RemoteEngine(Engine):
    name = "remote"

    def __init__(self, config: RemoteEngineConfig):
        self.urls = [u.rstrip("/") for u in config.urls]
        self.expected_version = config.expected_version
        self.health_interval_s = config.health_interval_s
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(config.timeout_s, connect=2.0),
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
        served = body.get("loaded_versions") or [body.get("model_version")]
        if self.expected_version and self.expected_version not in served:
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
        payload = WireRequest.of(request, model_version=self.expected_version).model_dump()
        self._in_flight += 1
        try:
            for url in self._order():
                try:
                    resp = await self._client.post(f"{url}/internal/engine/topk", json=payload,
                                                   headers={"X-Request-Id": request.request_id})
                except _CONNECT_ERRORS:
                    self._up[url] = False
                    continue
                if resp.status_code in (409, 503):  # that worker is not ready, or on another version
                    self._up[url] = False
                    continue
                self._up[url] = True
                self._raise_for(resp)
                return items_from_wire(resp.json()["items"])
        finally:
            self._in_flight -= 1
        raise EngineUnavailable(f"no engine worker reachable ({', '.join(self.urls)})")

    async def reason(self, request: EngineRequest, max_reasoning_tokens: int
                     ) -> AsyncIterator[ReasoningDelta | ReasoningDone]:
        payload = WireRequest.of(request, max_reasoning_tokens, model_version=self.expected_version).model_dump()
        self._in_flight += 1
        try:
            for url in self._order():
                try:
                    # Leaving this block (consumer closed us) closes the connection, which makes the
                    # worker's stream see a disconnect and abort its generation.
                    async with self._client.stream("POST", f"{url}/internal/engine/reason", json=payload,
                                                   headers={"X-Request-Id": request.request_id}) as resp:
                        if resp.status_code in (409, 503):
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
                                yield ReasoningDone(items_from_wire(msg["items"]), int(msg["reasoning_tokens"]),
                                                    str(msg.get("finish_reason", "end_of_thinking")))
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
