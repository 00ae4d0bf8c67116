"""POST /v1/recommendations/stream: event order and content, limits, back-pressure, in-band errors,
and client disconnects aborting the engine's generation (over a real uvicorn socket)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from model_store.tokens import REASONING_LABELS, SPECIAL_TOKENS
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")

HISTORY = ["sku-3", "sku-14", "sku-15", "sku-92"]


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


class SSEReader:
    """Events from a live stream. Keeps one text iterator for the response's lifetime: abandoning a
    half-read httpx iterator closes the connection, which the server would see as a disconnect."""

    def __init__(self, resp: httpx.Response):
        self._chunks = resp.aiter_text()
        self._buffer = ""

    async def read(self, stop_after: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        while True:
            while "\n\n" in self._buffer:
                block, self._buffer = self._buffer.split("\n\n", 1)
                events.extend(parse_sse(block))
                if stop_after and events[-1][0] == stop_after:
                    return events
            try:
                self._buffer += await anext(self._chunks)
            except StopAsyncIteration:
                return events


async def test_stream_event_order_and_content(make_client: Any, gw_bundle: Any) -> None:
    async with make_client() as client:
        resp = await client.post("/v1/recommendations/stream",
                                 json={"history": HISTORY, "k": 5, "max_reasoning_tokens": 24},
                                 headers={"X-Request-Id": "stream-1"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"] == "stream-1"
        events = parse_sse(resp.text)
        kinds = [kind for kind, _ in events]
        n = kinds.count("reasoning")
        assert n >= 1 and kinds == ["reasoning"] * n + ["items", "done"]
        text = "".join(data["delta"] for kind, data in events if kind == "reasoning")
        # No markers leak into the reasoning, and item IDs only in the rewrite section.
        assert not re.search(r"<[a-j]_\d+>", text.split(REASONING_LABELS["rewrite"])[0])
        assert not any(marker in text for marker in SPECIAL_TOKENS)
        items = events[-2][1]["items"]
        got = [item["item_id"] for item in items]
        assert len(got) == 5 == len(set(got)) and not set(got) & set(HISTORY)
        assert all(item["semantic_id"] == gw_bundle.spelled_id(gw_bundle.index_of[item["item_id"]])
                   for item in items)
        done = events[-1][1]
        assert done["request_id"] == "stream-1"
        assert 1 <= done["reasoning_tokens"] <= 24 and done["latency_ms"] > 0
        assert done["finish_reason"] in ("end_of_thinking", "length")
        assert [c["section"] for c in done["citations"]] == [
            s for s in REASONING_LABELS if REASONING_LABELS[s] in text]
        metrics = (await client.get("/metrics")).text
        assert "gream_reasoning_first_token_seconds_count 1.0" in metrics
        assert "gream_reasoning_tokens_count 1.0" in metrics


async def test_stream_items_are_direct_modes_ranking(make_client: Any) -> None:
    """By default (GREAM_REASONING_ANSWER=history) the stream's items are ranked from the history, as
    direct mode ranks them: reasoning mode costs no accuracy, and the chain explains that ranking."""
    async with make_client() as client:
        body = {"history": HISTORY, "k": 5}
        direct = (await client.post("/v1/recommendations", json=body)).json()
        resp = await client.post("/v1/recommendations/stream", json={**body, "max_reasoning_tokens": 40})
        items = next(data for kind, data in parse_sse(resp.text) if kind == "items")["items"]
        assert [i["item_id"] for i in items] == [i["item_id"] for i in direct["items"]]


async def test_stream_respects_filters_and_falls_back(make_client: Any) -> None:
    async with make_client() as client:
        allow = ["sku-1", "sku-2", "sku-3", "sku-4"]
        resp = await client.post("/v1/recommendations/stream", json={
            "history": HISTORY, "k": 10, "allow_items": allow, "max_reasoning_tokens": 4})
        items = [i["item_id"] for i in parse_sse(resp.text)[-2][1]["items"]]
        assert sorted(items) == ["sku-1", "sku-2", "sku-4"]  # sku-3 was seen
        fallback = parse_sse((await client.post("/v1/recommendations/stream", json={"k": 3})).text)
        assert [kind for kind, _ in fallback] == ["items", "done"]
        assert all(i["fallback"] == "popular" for i in fallback[0][1]["items"])
        assert fallback[1][1]["reasoning_tokens"] == 0


async def test_stream_limits_are_4xx_before_the_stream_starts(make_client: Any) -> None:
    async with make_client(max_reasoning_tokens=64) as client:
        resp = await client.post("/v1/recommendations/stream", json={"history": HISTORY, "max_reasoning_tokens": 65})
        assert resp.status_code == 422 and resp.headers["content-type"] == "application/json"
        assert resp.json()["errors"][0]["field"] == "max_reasoning_tokens"
        unknown = await client.post("/v1/recommendations/stream", json={"history": ["sku-1", "zzz"]})
        assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_items"


async def test_closing_the_engine_stream_stops_generation(gw_engine: Any, gw_bundle: Any) -> None:
    from model_store.tokens import reasoning_prompt
    from service.engine.base import EngineRequest, ReasoningDelta

    request = EngineRequest("close-1", reasoning_prompt([gw_bundle.spelled_id(i) for i in (3, 14, 15)]), k=5)
    events = gw_engine.reason(request, 400)
    seen = 0
    async for event in events:
        assert isinstance(event, ReasoningDelta)
        seen += 1
        if seen == 3:
            break
    await events.aclose()
    record = next(r for r in gw_engine.recent_reasoning if r.request_id == "close-1")
    assert record.outcome == "cancelled" and record.tokens <= 4 < record.budget


async def test_client_disconnect_aborts_engine_work(gateway_settings: Any, gw_engine: Any, serve_app: Any) -> None:
    from service.app import create_app

    app = create_app(gateway_settings(), engine=gw_engine)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        # Precondition: for this history the greedy reasoning does not end by itself early on.
        full = await client.post("/v1/recommendations/stream",
                                 json={"history": HISTORY, "k": 3, "max_reasoning_tokens": 32})
        assert parse_sse(full.text)[-1][1]["reasoning_tokens"] == 32

        async with client.stream("POST", "/v1/recommendations/stream",
                                 json={"history": HISTORY, "k": 3, "max_reasoning_tokens": 512},
                                 headers={"X-Request-Id": "disconnect-1"}) as resp:
            assert resp.status_code == 200
            first = await SSEReader(resp).read(stop_after="reasoning")
            assert first[0][0] == "reasoning"
        # The client is gone: the engine must record the cancellation well before the budget.
        record = await eventually(
            lambda: next((r for r in gw_engine.recent_reasoning if r.request_id == "disconnect-1"), None))
        assert record is not None, "the engine never finished or cancelled the abandoned request"
        assert record.outcome == "cancelled"
        assert record.tokens < record.budget == 512
        metrics = (await client.get("/metrics")).text
        assert "gream_stream_disconnects_total 1.0" in metrics


async def test_stream_back_pressure_and_in_band_errors(gateway_settings: Any, gw_bundle: Any,
                                                       serve_app: Any) -> None:
    """A second concurrent stream past the limit gets a real 429; an engine failure after the
    stream started arrives as `event: error`."""
    from service.app import create_app
    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(gw_bundle, TransformersEngineConfig(max_concurrent_reasoning=1, torch_threads=1))
    await engine.start()
    try:
        app = create_app(gateway_settings(), engine=engine)
        body = {"history": HISTORY, "k": 3, "max_reasoning_tokens": 512}
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/v1/recommendations/stream", json=body) as first:
                reader = SSEReader(first)
                events = await reader.read(stop_after="reasoning")
                assert events[0][0] == "reasoning"
                second = await client.post("/v1/recommendations/stream", json=body)
                assert second.status_code == 429 and second.json()["code"] == "overloaded"
                assert int(second.headers["retry-after"]) >= 1
                # Now the engine goes away mid-stream.
                await engine.close()
                rest = await reader.read()
            kinds = [kind for kind, _ in rest]
            assert kinds[-1] == "error" and "items" not in kinds and "done" not in kinds
            assert rest[-1][1]["code"] == "engine_unavailable" and rest[-1][1]["message"]
    finally:
        await engine.close()
