"""Polling for a condition that becomes true a little later (an engine cancels a request, a Redis
client reconnects), instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(probe: Callable[[], T | Awaitable[T]], until: Callable[[T], bool] = bool,
                     timeout_s: float = 10.0, interval_s: float = 0.025) -> T:
    """Call `probe` (sync or async) until `until(value)` holds or `timeout_s` passes; the last value
    either way, for the test to assert on."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value) or time.monotonic() > deadline:
            return value  # type: ignore[return-value]
        await asyncio.sleep(interval_s)
