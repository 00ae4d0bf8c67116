"""Gateway -> remote engine worker over HTTP: same answers as in-process, round robin with failover,
503 when every worker is down, streams relayed, and an abandoned stream aborts the worker's work."""

from __future__ import annotations

from typing import Any

import pytest

from model_store.tokens import reasoning_prompt
from service.engine.base import EngineRequest, EngineUnavailable, ReasoningDelta
from service.engine.config import RemoteEngineConfig
from service.engine.remote import RemoteEngine
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")

DEAD_URL = "http://127.0.0.1:9"  # discard port: connection refused
KEY = "worker-key-123"


@pytest.fixture
def worker_app(gateway_settings: Any, gw_engine: Any) -> Any:
    from service.app import create_app

    return create_app(gateway_settings(expose_engine_api=True, api_keys=[KEY]), engine=gw_engine)


async def test_remote_engine_matches_in_process_and_fails_over(make_client: Any, worker_app: Any, serve_app: Any,
                                                               gw_bundle: Any) -> None:
    body = {"history": ["sku-3", "sku-14", "sku-15"], "k": 8, "exclude_items": ["sku-28"]}
    async with make_client() as local:
        expected = (await local.post("/v1/recommendations", json=body)).json()["items"]
    async with serve_app(worker_app) as worker_url:
        remote = RemoteEngine(RemoteEngineConfig(urls=[DEAD_URL, worker_url], api_key=KEY,
                                                 expected_version=gw_bundle.version))
        try:
            async with make_client(engine=remote, redis_url=None) as gateway:
                assert (await gateway.get("/readyz")).json()["engine"] == "remote"
                for _ in range(3):  # round robin starts at the dead worker at least once
                    resp = await gateway.post("/v1/recommendations", json=body, headers={"X-Request-Id": "rr-1"})
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["items"] == expected
                stream = await gateway.post("/v1/recommendations/stream",
                                            json={**body, "max_reasoning_tokens": 6})
                assert stream.status_code == 200
                kinds = [line[7:] for line in stream.text.splitlines() if line.startswith("event: ")]
                assert kinds == ["reasoning"] * 6 + ["items", "done"]
        finally:
            await remote.close()


async def test_abandoned_remote_stream_aborts_worker(worker_app: Any, serve_app: Any, gw_engine: Any,
                                                     gw_bundle: Any) -> None:
    async with serve_app(worker_app) as worker_url:
        remote = RemoteEngine(RemoteEngineConfig(urls=[worker_url], api_key=KEY))
        await remote.start()
        try:
            prompt = reasoning_prompt([gw_bundle.spelled_id(i) for i in (1, 2, 3)])
            events = remote.reason(EngineRequest("remote-abort-1", prompt, k=3), 512)
            async for event in events:
                assert isinstance(event, ReasoningDelta)
                break
            await events.aclose()
            record = await eventually(
                lambda: next((r for r in gw_engine.recent_reasoning if r.request_id == "remote-abort-1"), None))
            assert record is not None and record.outcome == "cancelled" and record.tokens < 512
        finally:
            await remote.close()


async def test_all_workers_down(make_client: Any) -> None:
    remote = RemoteEngine(RemoteEngineConfig(urls=[DEAD_URL, "http://127.0.0.1:1"], timeout_s=2))
    try:
        with pytest.raises(EngineUnavailable, match="no engine worker reachable"):
            await remote.recommend(EngineRequest("x", "prompt", k=1))
        async with make_client(engine=remote, redis_url=None) as gateway:
            ready = await gateway.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            resp = await gateway.post("/v1/recommendations", json={"history": ["sku-1"], "k": 2})
            assert resp.status_code == 503 and resp.json()["code"] == "engine_unavailable"
    finally:
        await remote.close()


async def test_worker_routes_need_the_key(worker_app: Any, serve_app: Any) -> None:
    import httpx

    async with serve_app(worker_app) as worker_url, httpx.AsyncClient(base_url=worker_url) as client:
        payload = {"request_id": "x", "prompt": "p", "k": 1}
        assert (await client.post("/internal/engine/topk", json=payload)).status_code == 401
