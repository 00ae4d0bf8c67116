"""The throughput curve and its knee, and a soak at the knee (no failures, bounded memory growth)."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from loadtests.reliability_runs.common import gateway, log
from loadtests.reliability_runs.load import Load, histories, item_ids, summarize


def run_knee(bundle: Path, out: Path, step_seconds: float, levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
             ) -> dict[str, Any]:
    with gateway(bundle, out, "knee-gateway") as server:
        load = Load(server.url, histories(bundle), item_ids(bundle))
        asyncio.run(load.run(2, 3))  # warm-up
        curve = []
        for c in levels:
            stats = summarize(asyncio.run(load.run(c, step_seconds)), step_seconds)
            curve.append({"concurrency": c, **stats})
            log(f"knee: concurrency {c:>3}: {stats['rps']:7.2f} req/s  p50 {stats['p50_ms']} ms  "
                f"p99 {stats['p99_ms']} ms  {stats['statuses']}")
    best = max(p["rps"] for p in curve)
    knee = next(p["concurrency"] for p in curve if p["rps"] >= 0.9 * best)
    return {"run": "knee", "step_seconds": step_seconds, "curve": curve, "max_rps": best, "knee_concurrency": knee,
            "rule": "smallest concurrency reaching 90 % of the best throughput", "passed": True}


def run_soak(bundle: Path, out: Path, seconds: float, concurrency: int) -> dict[str, Any]:
    with gateway(bundle, out, "soak-gateway") as server:
        load = Load(server.url, histories(bundle), item_ids(bundle), mix={"direct": 7, "events": 2, "cached": 1})
        asyncio.run(load.run(2, 3))
        load.samples.clear()
        rss: list[tuple[float, int]] = []
        started = time.monotonic()

        async def sampler() -> None:
            while time.monotonic() - started < seconds:
                rss.append((time.monotonic() - started, server.rss_bytes()))
                await asyncio.sleep(5)

        async def both() -> None:
            await asyncio.gather(load.run(concurrency, seconds), sampler())

        asyncio.run(both())
        rss.append((time.monotonic() - started, server.rss_bytes()))
    warm = [r for t, r in rss if t >= min(60.0, seconds * 0.2)]
    base = statistics.median(warm[:3])
    end = statistics.median(warm[-3:])
    growth = (end - base) / base
    stats = summarize(load.samples, seconds)
    failures = stats["requests"] - stats["ok"]
    passed = failures == 0 and growth < 0.10
    log(f"soak: {seconds:.0f} s at concurrency {concurrency}: {stats['rps']} req/s, p50 {stats['p50_ms']} ms, "
        f"p99 {stats['p99_ms']} ms, failures {failures}, RSS {base / 2**20:.0f} -> {end / 2**20:.0f} MiB "
        f"({growth:+.1%})")
    return {"run": "soak", "seconds": seconds, "concurrency": concurrency, **stats, "failures": failures,
            "rss_mib_start": round(base / 2**20, 1), "rss_mib_end": round(end / 2**20, 1),
            "rss_growth": round(growth, 4), "rss_samples_mib": [(round(t), round(r / 2**20, 1)) for t, r in rss],
            "criteria": "no failures, RSS growth < 10 % (after warm-up)", "passed": passed}
