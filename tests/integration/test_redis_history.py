"""The Redis history store against the real server (db 15, a namespace of each test's own): the same
answers as the in-memory store, keys and TTL, atomic appends, and a fast, reported failure when Redis
is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from service.history import HistoryUnavailable, InMemoryHistoryStore, RedisHistoryStore, chunked_keep
from tests.support.redis_db import REDIS_URL, delete_namespace_async, new_namespace

DOWN_URL = "redis://127.0.0.1:6390/15"  # nothing listens there


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisHistoryStore]:
    namespace = new_namespace()
    store = RedisHistoryStore(REDIS_URL, cap=10, ttl_seconds=120, drop_chunk=4, namespace=namespace)
    yield store
    await delete_namespace_async(namespace)
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
