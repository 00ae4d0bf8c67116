"""Clients dropping their streams: the engine stops the abandoned work (running and queue depth back
to 0) well before a full stream would have ended, in-process and behind a remote engine worker."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from loadtests.harness import scrape_metrics
from loadtests.reliability_runs.common import gateway, log
from loadtests.reliability_runs.load import histories


async def drop_streams(url: str, n: int, tokens: int, history: list[list[str]]) -> list[float]:
    """n concurrent streams, each closed right after its first reasoning event; their TTFTs."""
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient) -> None:
        t0 = time.monotonic()
        async with client.stream("POST", "/v1/recommendations/stream",
                                 json={"history": random.choice(history), "k": 10, "max_reasoning_tokens": tokens}) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("event: reasoning"):
                    ttfts.append(time.monotonic() - t0)
                    break
        # leaving the block closes the connection mid-stream

    # one connection per stream, so closing it is a real TCP close the server sees
    clients = [httpx.AsyncClient(base_url=url, timeout=120) for _ in range(n)]
    try:
        await asyncio.gather(*(one(c) for c in clients))
    finally:
        for c in clients:
            await c.aclose()
    return ttfts


def full_stream_seconds(url: str, tokens: int, history: list[str]) -> tuple[float, int]:
    """How long one stream takes to its end, and its reasoning events."""
    t0 = time.monotonic()
    n = 0
    with httpx.stream("POST", f"{url}/v1/recommendations/stream", timeout=300,
                      json={"history": history, "k": 10, "max_reasoning_tokens": tokens}) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: reasoning"):
                n += 1
    return time.monotonic() - t0, n


def drained(urls: list[str], timeout: float) -> tuple[float | None, dict[str, dict[str, float]]]:
    """Seconds until every server reports no engine work running or queued (None: not in time)."""
    t0 = time.monotonic()
    last: dict[str, dict[str, float]] = {}
    while time.monotonic() - t0 < timeout:
        last = {u: scrape_metrics(u) for u in urls}
        if all(m.get("gream_engine_running", 0) == 0 and m.get("gream_engine_queue_depth", 0) == 0
               for m in last.values()):
            return time.monotonic() - t0, last
        time.sleep(0.1)
    return None, last


def run_disconnect(bundle: Path, out: Path, via_worker: bool, n: int = 8, rounds: int = 3,
                   tokens: int = 512) -> dict[str, Any]:
    results = []
    topologies = ["in-process"] + (["via-worker"] if via_worker else [])
    hist = histories(bundle)
    for topology in topologies:
        with ExitStack() as stack:
            if topology == "via-worker":
                worker = stack.enter_context(gateway(bundle, out, "disconnect-worker", env={"GREAM_EXPOSE_ENGINE_API": "true"}))
                server = stack.enter_context(gateway(bundle, out, "disconnect-gateway", "--engine-url", worker.url))
                watched = [server.url, worker.url]
            else:
                server = stack.enter_context(gateway(bundle, out, "disconnect-gateway"))
                watched = [server.url]
            full_s, full_tokens = full_stream_seconds(server.url, tokens, hist[0])
            before = {u: scrape_metrics(u) for u in watched}
            ttfts: list[float] = []
            drains = []
            for _ in range(rounds):
                ttfts += asyncio.run(drop_streams(server.url, n, tokens, hist))
                drain, _last = drained(watched, timeout=max(30.0, full_s * 3))
                drains.append(None if drain is None else round(drain, 3))
            time.sleep(0.5)
            after = {u: scrape_metrics(u) for u in watched}
            g0, g1 = before[server.url], after[server.url]
            entry = {
                "topology": topology, "streams_dropped": n * rounds, "max_reasoning_tokens": tokens,
                "full_stream_seconds": round(full_s, 2), "full_stream_reasoning_events": full_tokens,
                "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
                "drain_seconds_per_round": drains,
                "disconnects_counted": g1.get("gream_stream_disconnects_total", 0)
                - g0.get("gream_stream_disconnects_total", 0),
                "streams_completed_meanwhile": g1.get("gream_reasoning_tokens_count", 0)
                - g0.get("gream_reasoning_tokens_count", 0),
                "engine_running_after": {u: after[u].get("gream_engine_running") for u in watched},
                "engine_queue_after": {u: after[u].get("gream_engine_queue_depth") for u in watched},
            }
            entry["passed"] = bool(
                all(d is not None and d < max(2.0, 0.5 * full_s) for d in drains)
                and all(v == 0 for v in entry["engine_running_after"].values())
                and entry["disconnects_counted"] >= n * rounds
                and entry["streams_completed_meanwhile"] == 0)
            log(f"disconnect[{topology}]: {json.dumps(entry)}")
            results.append(entry)
    return {"run": "disconnect", "results": results, "passed": all(r["passed"] for r in results),
            "criteria": "after clients drop their streams, engine running and queue depth return to 0 "
                        "well before a full stream would have finished; no dropped stream completes"}
