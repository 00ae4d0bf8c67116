"""The engine in a child process (service.engine.process): the same items and scores as the in-process
engine, batches across callers, streams and aborts, overload as 429, and a child that dies fails its
calls with 503 and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from model_store.tokens import direct_prompt, reasoning_prompt
from service.engine.base import (
    EngineOverloaded,
    EngineRequest,
    EngineUnavailable,
    ReasoningDelta,
    ReasoningDone,
)
from service.engine.config import ProcessOptions, TransformersEngineConfig
from service.engine.process import ProcessEngine
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")

ENGINE = TransformersEngineConfig(default_beams=10, max_batch=32, batch_wait_ms=2, torch_threads=1)
PLAIN_LOGS = ProcessOptions(log_json=False, restart_backoff_s=0.1)


def _request(bundle: Any, rid: str, history: tuple[int, ...], k: int = 6, **kw: Any) -> EngineRequest:
    prompt = direct_prompt([bundle.spelled_id(i) for i in history])
    return EngineRequest(rid, prompt, k=k, history=history, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proc_engine(gw_bundle: Any) -> AsyncIterator[ProcessEngine]:
    engine = ProcessEngine(gw_bundle, ENGINE, PLAIN_LOGS)
    batches: list[int] = []
    engine.on_batch = lambda size, seconds: batches.append(size)
    engine.batches = batches  # type: ignore[attr-defined]
    await engine.start()
    yield engine
    await engine.close()


async def test_same_items_and_scores_as_in_process(proc_engine: ProcessEngine, gw_engine: Any, gw_bundle: Any) -> None:
    assert proc_engine.ready and proc_engine.pid != os.getpid()
    requests = [_request(gw_bundle, f"same-{h}", (h, h + 1, h + 2), exclude=frozenset({h + 3}),
                         allow=None if h % 2 else frozenset(range(0, 40, 3)))
                for h in range(8)]
    ours = await asyncio.gather(*(proc_engine.recommend(r) for r in requests))
    theirs = await asyncio.gather(*(gw_engine.recommend(r) for r in requests))
    for a, b in zip(ours, theirs, strict=True):
        assert [i.index for i in a] == [i.index for i in b]
        assert [i.score for i in a] == pytest.approx([i.score for i in b], abs=1e-5)
    # Concurrent callers share forward passes in the child, and its batch sizes reach our metrics hook.
    assert max(proc_engine.batches) > 1  # type: ignore[attr-defined]


async def test_stream_then_items_and_abort(proc_engine: ProcessEngine, gw_bundle: Any) -> None:
    prompt = reasoning_prompt([gw_bundle.spelled_id(i) for i in (1, 2, 3)])
    events = [e async for e in proc_engine.reason(EngineRequest("stream-1", prompt, k=4), 6)]
    assert all(isinstance(e, ReasoningDelta) for e in events[:-1]) and len(events) > 1
    done = events[-1]
    assert isinstance(done, ReasoningDone) and done.reasoning_tokens == 6 and len(done.items) == 4

    before = proc_engine.stats().extra.get("reasoning_cancelled", 0.0)
    stream = proc_engine.reason(EngineRequest("stream-2", prompt, k=4), 512)
    async for event in stream:
        assert isinstance(event, ReasoningDelta)
        break
    await stream.aclose()  # what the gateway does when the client disconnects
    await eventually(lambda: proc_engine.stats().extra.get("reasoning_cancelled", 0.0) > before)
    assert proc_engine.stats().extra["reasoning_cancelled"] == before + 1


async def test_full_queue_is_overload_with_retry_after(gw_bundle: Any) -> None:
    config = ENGINE.model_copy(update={"queue_max": 1, "max_batch": 1})
    engine = ProcessEngine(gw_bundle, config, PLAIN_LOGS)
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.recommend(_request(gw_bundle, f"q-{i}", (i, i + 1)))
                                         for i in range(40)), return_exceptions=True)
        overloaded = [r for r in results if isinstance(r, EngineOverloaded)]
        assert overloaded and all(r.retry_after >= 1 for r in overloaded)
        assert any(isinstance(r, list) and len(r) == 6 for r in results)
    finally:
        await engine.close()


async def test_dead_child_fails_calls_then_is_replaced(proc_engine: ProcessEngine, gw_bundle: Any) -> None:
    first_pid = proc_engine.pid
    assert first_pid is not None
    calls = [asyncio.ensure_future(proc_engine.recommend(_request(gw_bundle, f"kill-{i}", (i, i + 1, i + 2), k=10,
                                                                   num_beams=60)))
             for i in range(16)]
    await asyncio.sleep(0)  # the calls are on the wire
    os.kill(first_pid, signal.SIGKILL)
    results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in results if isinstance(r, EngineUnavailable)]
    assert failed, "calls in flight when the child died must fail, not hang"
    assert all(isinstance(r, EngineUnavailable | list) for r in results)
    # The calls failed because the reader saw the child's end of stream, so the engine is down now.
    assert not proc_engine.ready
    with pytest.raises(EngineUnavailable):
        await proc_engine.recommend(_request(gw_bundle, "while-down", (1, 2)))
    await eventually(lambda: proc_engine.ready, timeout_s=60)  # a new child loads the bundle and warms up
    assert proc_engine.ready and proc_engine.pid not in (None, first_pid) and proc_engine.restarts == 1
    items = await proc_engine.recommend(_request(gw_bundle, "after", (1, 2, 3)))
    assert len(items) == 6


async def test_gateway_serves_through_a_child_process(make_client: Any, gw_bundle: Any,
                                                      proc_engine: ProcessEngine) -> None:
    body = {"history": ["sku-3", "sku-14", "sku-15"], "k": 8, "exclude_items": ["sku-28"]}
    async with make_client() as local:
        expected = (await local.post("/v1/recommendations", json=body)).json()["items"]
    async with make_client(engine=proc_engine, redis_url=None) as gateway:
        assert (await gateway.get("/readyz")).json()["engine"] == "transformers-process"
        resp = await gateway.post("/v1/recommendations", json=body)
        assert resp.status_code == 200, resp.text
        assert [i["item_id"] for i in resp.json()["items"]] == [i["item_id"] for i in expected]
