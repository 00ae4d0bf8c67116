"""The real Redis the tests use (db 15 unless GREAM_TEST_REDIS_URL says otherwise), namespaces of a
test's own, and their cleanup."""

from __future__ import annotations

import os
import uuid

REDIS_URL = os.environ.get("GREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def new_namespace(prefix: str = "gtest") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def redis_answers(url: str = REDIS_URL) -> bool:
    """Whether a Redis answers PING at `url` within half a second."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def delete_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Delete the keys under `namespace`, and only those."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def delete_namespace_async(namespace: str, url: str = REDIS_URL) -> None:
    """delete_namespace for tests on an event loop."""
    import redis.asyncio as aredis

    client = aredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
