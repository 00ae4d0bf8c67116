"""The in-memory history store: chunked capping, order, TTL and LRU eviction (the Redis store's tests,
which need a server, are in tests/integration/test_redis_history.py)."""

from __future__ import annotations

import pytest

from service.history import InMemoryHistoryStore, chunked_keep


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
