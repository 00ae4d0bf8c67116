"""Redis outages: requests carrying their history keep working, those needing the cache get a clear
503, events are never acknowledged unless written, /readyz says degraded, and the gateway recovers
by itself when Redis comes back (a throwaway redis-server we stop and restart)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from loadtests.harness import start_redis
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOWN_URL = "redis://127.0.0.1:6390/0"  # nothing listens there
SCRATCH_PORT = 6391


async def test_gateway_with_redis_down(make_client: Any) -> None:
    async with make_client(redis_url=DOWN_URL) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["history_store_state"] == "down"

        own = await client.post("/v1/recommendations", json={"user_id": "u", "history": ["sku-1"], "k": 3})
        assert own.status_code == 200 and len(own.json()["items"]) == 3
        anonymous = await client.post("/v1/recommendations", json={"k": 3})
        assert anonymous.status_code == 200 and anonymous.json()["fallback"] == "popular"
        stream = await client.post("/v1/recommendations/stream",
                                   json={"history": ["sku-1"], "k": 2, "max_reasoning_tokens": 2})
        assert stream.status_code == 200 and "event: done" in stream.text

        cached = await client.post("/v1/recommendations", json={"user_id": "u", "k": 3})
        assert cached.status_code == 503
        body = cached.json()
        assert body["code"] == "history_unavailable" and "history" in body["message"]
        assert cached.headers["retry-after"]

        event = await client.post("/v1/users/u/events", json={"events": [{"item_id": "sku-1"}]})
        assert event.status_code == 503 and event.json()["code"] == "history_unavailable"
        assert (await client.get("/v1/users/u/history")).status_code == 503
        assert (await client.delete("/v1/users/u/history")).status_code == 503

        metrics = (await client.get("/metrics")).text
        for op in ("get", "append", "ping"):
            assert f'gream_redis_errors_total{{op="{op}"}}' in metrics


@pytest.fixture
def scratch_redis() -> Iterator[Any]:
    """Start/stop control over a private redis-server (no persistence) on port 6391."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not available")

    class Server:
        proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = start_redis(SCRATCH_PORT)

        def stop(self) -> None:
            if self.proc is not None:
                self.proc.terminate()
                self.proc.wait(timeout=10)
                self.proc = None

    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_recovers_without_restart(make_client: Any, scratch_redis: Any) -> None:
    async with make_client(redis_url=f"redis://127.0.0.1:{SCRATCH_PORT}/0") as client:
        ok = await client.post("/v1/users/r/events", json={"events": [{"item_id": "sku-7"}]})
        assert ok.status_code == 202 and ok.json()["history_length"] == 1

        scratch_redis.stop()
        refused = await client.post("/v1/users/r/events", json={"events": [{"item_id": "sku-8"}]})
        assert refused.status_code == 503
        assert (await client.get("/readyz")).json()["status"] == "degraded"

        scratch_redis.start()  # a fresh, empty Redis (no persistence)
        # The pool reconnects on the next command; allow a moment.
        back = await eventually(lambda: client.post("/v1/users/r/events", json={"events": [{"item_id": "sku-9"}]}),
                                until=lambda resp: resp.status_code == 202, timeout_s=5, interval_s=0.1)
        assert back.status_code == 202 and back.json()["history_length"] == 1
        assert (await client.get("/readyz")).json()["status"] == "ready"
        # sku-8 was refused, so it must not have been stored anywhere.
        assert (await client.get("/v1/users/r/history")).json()["items"] == ["sku-9"]
