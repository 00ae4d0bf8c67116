"""Per-user interaction histories: Redis in production, an in-memory store as the embedded default.

Both stores keep at most `cap` items per user, oldest first, and trim the oldest in chunks of
`drop_chunk` (docs/architecture.md, "Prompt layout and caching"): trimming one item per event would change the
prompt's first tokens on every request and defeat the engine's prefix cache. Each user's list
expires `ttl` seconds after its last write.

A store that cannot be reached raises `HistoryUnavailable`; the gateway turns that into a 503 for
requests that need the cache and never acknowledges an event it did not write.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from service.config import Settings

StoreState = Literal["up", "down", "memory"]


class HistoryUnavailable(RuntimeError):
    """The history store cannot be reached; nothing was read or written."""


def chunked_keep(length: int, cap: int, drop_chunk: int) -> int:
    """How many oldest items to drop from a list of `length` so it fits `cap`, in whole chunks."""
    excess = length - cap
    if excess <= 0:
        return 0
    chunk = max(1, min(drop_chunk, cap))
    return min(length, math.ceil(excess / chunk) * chunk)


class HistoryStore(abc.ABC):
    kind: str = "store"

    def __init__(self, cap: int, ttl_seconds: int, drop_chunk: int):
        if cap < 1 or ttl_seconds < 1 or drop_chunk < 1:
            raise ValueError("cap, ttl_seconds and drop_chunk must be >= 1")
        self.cap = cap
        self.ttl_seconds = ttl_seconds
        self.drop_chunk = drop_chunk

    @abc.abstractmethod
    async def get(self, user_id: str) -> list[str]:
        """The user's history, oldest first ([] for an unknown or expired user)."""

    @abc.abstractmethod
    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Append atomically (trim + refresh TTL in the same step); returns the new length."""

    @abc.abstractmethod
    async def delete(self, user_id: str) -> bool:
        """Forget a user; True when there was something to delete."""

    @abc.abstractmethod
    async def state(self) -> StoreState:
        """Reachability, for /readyz."""

    async def connect(self) -> None:
        """Open connections (a failure here is not fatal: the store recovers on its own)."""

    async def close(self) -> None:
        pass


class InMemoryHistoryStore(HistoryStore):
    """Process-local store, LRU-bounded in users so memory stays bounded too."""

    kind = "memory"

    def __init__(self, cap: int = 50, ttl_seconds: int = 30 * 86400, drop_chunk: int = 10,
                 max_users: int = 100_000, clock: Callable[[], float] = time.monotonic):
        super().__init__(cap, ttl_seconds, drop_chunk)
        self.max_users = max_users
        self._clock = clock
        self._data: OrderedDict[str, tuple[list[str], float]] = OrderedDict()
        self._lock = asyncio.Lock()

    def _live(self, user_id: str) -> list[str] | None:
        entry = self._data.get(user_id)
        if entry is None:
            return None
        items, expires = entry
        if expires <= self._clock():
            del self._data[user_id]
            return None
        return items

    async def get(self, user_id: str) -> list[str]:
        items = self._live(user_id)
        return list(items) if items else []

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        async with self._lock:
            items = (self._live(user_id) or []) + list(item_ids)
            items = items[chunked_keep(len(items), self.cap, self.drop_chunk):]
            self._data[user_id] = (items, self._clock() + self.ttl_seconds)
            self._data.move_to_end(user_id)
            while len(self._data) > self.max_users:
                self._data.popitem(last=False)
            return len(items)

    async def delete(self, user_id: str) -> bool:
        return self._data.pop(user_id, None) is not None

    async def state(self) -> StoreState:
        return "memory"


# RPUSH, chunked trim and TTL refresh in one atomic server-side step. ARGV: ttl_ms, cap, drop_chunk,
# then the item ids.
_APPEND_LUA = """
local key = KEYS[1]
local ttl_ms = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local chunk = tonumber(ARGV[3])
local n = redis.call('RPUSH', key, unpack(ARGV, 4))
if n > cap then
  if chunk > cap then chunk = cap end
  local drop = math.ceil((n - cap) / chunk) * chunk
  if drop > n then drop = n end
  redis.call('LTRIM', key, drop, -1)
  n = n - drop
end
redis.call('PEXPIRE', key, ttl_ms)
return n
"""


class RedisHistoryStore(HistoryStore):
    """`redis.asyncio` with a connection pool; keys are `{namespace}:v1:hist:{user_id}`.

    Timeouts are short and retries off, so an outage costs a request milliseconds rather than
    seconds; the pool reconnects by itself on the next command once Redis is back.
    """

    kind = "redis"
    KEY_VERSION = "v1"

    def __init__(self, url: str, cap: int = 50, ttl_seconds: int = 30 * 86400, drop_chunk: int = 10,
                 namespace: str = "gream", max_connections: int = 64, timeout_s: float = 1.0,
                 on_error: Callable[[str], None] | None = None):
        super().__init__(cap, ttl_seconds, drop_chunk)
        from redis.asyncio import ConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.prefix = f"{namespace}:{self.KEY_VERSION}:hist:"
        self._on_error = on_error
        self._pool = ConnectionPool.from_url(
            url, max_connections=max_connections, decode_responses=True,
            socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self._redis = Redis(connection_pool=self._pool)
        self._append = self._redis.register_script(_APPEND_LUA)

    def key(self, user_id: str) -> str:
        return self.prefix + user_id

    def _fail(self, op: str, exc: Exception) -> HistoryUnavailable:
        if self._on_error is not None:
            self._on_error(op)
        return HistoryUnavailable(f"history store (Redis) unavailable during {op}: "
                                  f"{type(exc).__name__}: {exc}")

    async def get(self, user_id: str) -> list[str]:
        from redis.exceptions import RedisError

        try:
            return list(await self._redis.lrange(self.key(user_id), 0, -1))
        except (RedisError, OSError) as exc:
            raise self._fail("get", exc) from exc

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        from redis.exceptions import RedisError

        if not item_ids:
            return len(await self.get(user_id))
        args = [self.ttl_seconds * 1000, self.cap, self.drop_chunk, *item_ids]
        try:
            return int(await self._append(keys=[self.key(user_id)], args=args))
        except (RedisError, OSError) as exc:
            raise self._fail("append", exc) from exc

    async def delete(self, user_id: str) -> bool:
        from redis.exceptions import RedisError

        try:
            return bool(await self._redis.delete(self.key(user_id)))
        except (RedisError, OSError) as exc:
            raise self._fail("delete", exc) from exc

    async def state(self) -> StoreState:
        from redis.exceptions import RedisError

        try:
            await self._redis.ping()
            return "up"
        except (RedisError, OSError):
            if self._on_error is not None:
                self._on_error("ping")
            return "down"

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()


def create_history_store(settings: Settings, on_error: Callable[[str], None] | None = None) -> HistoryStore:
    """The store the settings ask for: Redis when `redis_url` is set, else in-memory."""
    s = settings
    if s.redis_url:
        return RedisHistoryStore(s.redis_url, cap=s.history_cap, ttl_seconds=s.history_ttl_seconds,
                                 drop_chunk=s.history_drop_chunk, namespace=s.redis_namespace,
                                 max_connections=s.redis_max_connections, on_error=on_error)
    return InMemoryHistoryStore(cap=s.history_cap, ttl_seconds=s.history_ttl_seconds,
                                drop_chunk=s.history_drop_chunk, max_users=s.memory_store_max_users)
