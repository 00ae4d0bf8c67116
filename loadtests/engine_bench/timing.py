"""How rows are measured: batches for synchronous decoders, requests in flight for asynchronous
engines, time windows of a closed loop of callers (as wrk and locust measure), and rounds on which
engines take turns."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from loadtests.engine_bench.rows import Row


def run_batches(name: str, fn: Callable[[Sequence[str]], list[list[int]]], prompts: Sequence[str],
                batch: int) -> Row:
    """Synchronous engines: `batch` prompts per call; each request's latency is its batch's time."""
    lat: list[float] = []
    results: list[list[int]] = []
    started = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"{name} c={batch}", unit="req", leave=False) as bar:
        for lo in range(0, len(prompts), batch):
            chunk = prompts[lo:lo + batch]
            t = time.perf_counter()
            results.extend(fn(chunk))
            lat.extend([time.perf_counter() - t] * len(chunk))
            bar.update(len(chunk))
    return Row(name, batch, lat, time.perf_counter() - started, results)


async def run_async(name: str, fn: Callable[[int], Awaitable[list[int]]], indices: Sequence[int] | int,
                    concurrency: int) -> Row:
    """Asynchronous engines: `concurrency` requests in flight at all times (requests `indices`, or
    0..n-1 for an int)."""
    order = list(range(indices)) if isinstance(indices, int) else list(indices)
    n = len(order)
    lat = [0.0] * n
    results: list[list[int]] = [[] for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=n, desc=f"{name} c={concurrency}", unit="req", leave=False)

    async def one(slot: int) -> None:
        async with sem:
            t = time.perf_counter()
            results[slot] = await fn(order[slot])
            lat[slot] = time.perf_counter() - t
            bar.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(one(slot) for slot in range(n)))
    wall = time.perf_counter() - started
    bar.close()
    return Row(name, concurrency, lat, wall, results)


async def run_window(name: str, fn: Callable[[int], Awaitable[list[Any]]], indices: Sequence[int],
                     concurrency: int, window_s: float, warm_up_s: float = 0.5, progress: bool = True,
                     clock: Callable[[], float] = time.perf_counter) -> Row:
    """A closed loop of `concurrency` callers cycling over the requests `indices` for `warm_up_s` +
    `window_s`; the row holds the requests that complete inside the window (after the warm-up), as
    wrk and locust measure. A batching server thus sees `concurrency` callers for the whole window: a
    fixed set of requests instead ramps up and down, and its partial batches are charged to the
    server (the bare engine's rows get whole batches by construction). Every request's result is kept
    (its first answer): callers go on past the window, for the missing ones only, until each has one."""
    order = list(indices)
    results: dict[int, list[Any]] = {}
    in_flight: set[int] = set()
    lat: list[float] = []
    cycle = itertools.count()
    started = clock()
    opens, closes = started + warm_up_s, started + warm_up_s + window_s
    bar = tqdm(total=round(warm_up_s + window_s, 1), desc=f"{name} c={concurrency}", unit="s", leave=False,
               disable=not progress, bar_format="{desc}: {n:.1f}/{total} s")

    def pick() -> int | None:
        if clock() < closes:
            return next(cycle) % len(order)
        missing = [s for s in range(len(order)) if s not in results and s not in in_flight]
        return missing[0] if missing else None

    async def caller() -> None:
        while (slot := pick()) is not None:
            in_flight.add(slot)
            t = clock()
            out = await fn(order[slot])
            end = clock()
            in_flight.discard(slot)
            results.setdefault(slot, out)
            if opens <= end <= closes:
                lat.append(end - t)
            bar.n = round(min(end - started, warm_up_s + window_s), 1)
            bar.refresh()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    bar.close()
    return Row(name, concurrency, lat, window_s, [results[s] for s in range(len(order))])


def rounds_of(n: int, rounds: int) -> list[range]:
    """`rounds` consecutive slices of 0..n-1 (engines take turns on them, so a slow minute of a noisy
    machine is shared by every engine instead of landing on one row)."""
    bounds = np.linspace(0, n, max(1, rounds) + 1).astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def run_interleaved(fns: dict[str, Callable[[Sequence[str]], list[list[int]]]], prompts: Sequence[str],
                    batch: int, rounds: int) -> dict[str, Row]:
    """Every engine on every round's prompts, the engines' order rotated from round to round."""
    rows = {name: Row(name, batch, [], 0.0) for name in fns}
    names = list(fns)
    for r, part in enumerate(rounds_of(len(prompts), rounds)):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rows[name].add(run_batches(name, fns[name], [prompts[i] for i in part], batch))
    return rows
