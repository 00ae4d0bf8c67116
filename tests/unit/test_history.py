"""History stores: chunked capping, TTL, atomic appends, namespacing, and failure when Redis is down.
The Redis tests use the real server (db 15) under a namespace of their own."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
import redis.asyncio as redis

from service.history import HistoryUnavailable, InMemoryHistoryStore, RedisHistoryStore, chunked_keep

REDIS_URL = os.environ.get("GREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DOWN_URL = "redis://127.0.0.1:6390/15"  # nothing listens there


@pytest.mark.parametrize(("length", "cap", "chunk", "drop"), [
    (5, 10, 3, 0), (10, 10, 3, 0), (11, 10, 3, 3), (13, 10, 3, 3), (14, 10, 3, 6), (25, 10, 10, 20),
    (4, 2, 5, 2),  # chunk larger than the cap: drop within the cap
])
def test_chunked_keep(length: int, cap: int, chunk: int, drop: int) -> None:
    assert chunked_keep(length, cap, chunk) == drop
    assert length - drop <= cap


async def test_memory_store_caps_in_chunks_and_keeps_order() -> None:
    store = InMemoryHistoryStore(cap=10, ttl_seconds=60, drop_chunk=4)
    for i in range(10):
        assert await store.append("u", [f"i{i}"]) == i + 1
    # The 11th item drops the 4 oldest at once, so the next 3 appends keep the same first item.
    assert await store.append("u", ["i10"]) == 7
    assert (await store.get("u"))[0] == "i4"
    for i in range(11, 14):
        await store.append("u", [f"i{i}"])
        assert (await store.get("u"))[0] == "i4"
    assert await store.get("u") == [f"i{i}" for i in range(4, 14)]
    assert await store.get("nobody") == []


async def test_memory_store_ttl_lru_and_delete() -> None:
    now = [1000.0]
    store = InMemoryHistoryStore(cap=5, ttl_seconds=10, drop_chunk=1, max_users=2, clock=lambda: now[0])
    await store.append("a", ["x"])
    now[0] += 11
    assert await store.get("a") == []  # expired
    await store.append("a", ["x"])
    await store.append("b", ["y"])
    await store.append("c", ["z"])  # evicts the least recently written user
    assert await store.get("a") == []
    assert await store.get("c") == ["z"]
    assert await store.delete("c") is True
    assert await store.delete("c") is False
    assert await store.state() == "memory"


@pytest.fixture
async def redis_store() -> RedisHistoryStore:
    namespace = f"gtest{uuid.uuid4().hex[:10]}"
    store = RedisHistoryStore(REDIS_URL, cap=10, ttl_seconds=120, drop_chunk=4, namespace=namespace)
    yield store
    client = redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    await store.close()


async def test_redis_store_matches_memory_store(redis_store: RedisHistoryStore) -> None:
    memory = InMemoryHistoryStore(cap=10, ttl_seconds=120, drop_chunk=4)
    batches = [["a"], ["b", "c"], ["d"] * 5, ["e"], [f"x{i}" for i in range(7)], ["f"], ["g", "h", "i"]]
    for batch in batches:
        assert await redis_store.append("u1", batch) == await memory.append("u1", batch)
        assert await redis_store.get("u1") == await memory.get("u1")


async def test_redis_store_keys_ttl_and_delete(redis_store: RedisHistoryStore) -> None:
    await redis_store.append("user:7", ["a", "b"])
    client = redis.from_url(REDIS_URL, decode_responses=True)
    key = f"{redis_store.prefix}user:7"
    assert key.endswith(":v1:hist:user:7")
    assert await client.lrange(key, 0, -1) == ["a", "b"]
    ttl_ms = await client.pttl(key)
    assert 0 < ttl_ms <= 120_000
    await client.aclose()
    assert await redis_store.state() == "up"
    assert await redis_store.delete("user:7") is True
    assert await redis_store.get("user:7") == []


async def test_redis_appends_are_atomic_under_concurrency(redis_store: RedisHistoryStore) -> None:
    lengths = await asyncio.gather(*[redis_store.append("u", [f"i{n}"]) for n in range(40)])
    # Whatever order Redis ran them in, each append + trim was one step, so the lengths seen are
    # exactly those of 40 sequential appends.
    expected, n = [], 0
    for _ in range(40):
        n += 1
        n -= chunked_keep(n, 10, 4)
        expected.append(n)
    assert sorted(lengths) == sorted(expected)
    history = await redis_store.get("u")
    assert len(history) == expected[-1] == len(set(history))


async def test_redis_down_raises_fast_and_reports_errors() -> None:
    errors: list[str] = []
    store = RedisHistoryStore(DOWN_URL, namespace="gtestdown", on_error=errors.append)
    started = time.perf_counter()
    with pytest.raises(HistoryUnavailable, match="unavailable during get"):
        await store.get("u")
    with pytest.raises(HistoryUnavailable, match="unavailable during append"):
        await store.append("u", ["a"])
    assert await store.state() == "down"
    assert time.perf_counter() - started < 3.0
    assert errors == ["get", "append", "ping"]
    await store.close()
