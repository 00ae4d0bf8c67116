"""The gateway rows: `gream serve` in a subprocess, driven over real sockets by the load generator,
paired with its bare engine (the same engine class and settings, in this process, without HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtests.engine_bench.loadgen import LoadGenerator
from loadtests.engine_bench.rows import BEAMS, DTYPES, K, Row
from loadtests.engine_bench.timing import rounds_of, run_window
from loadtests.harness import scrape_metrics_async, start_gateway


def engine_settings(bundle_dir: Path, env: Mapping[str, str]) -> Any:
    """The Settings a gateway started with the environment `env` runs its engine with."""
    from service.config import Settings

    fields = {key[len("GREAM_"):].lower(): value for key, value in env.items() if key.startswith("GREAM_")}
    known = {name: value for name, value in fields.items() if name in Settings.model_fields}
    return Settings(_env_file=None, **{**known, "bundle": bundle_dir})


def engine_label(engine: Any) -> str:
    """What runs behind the gateway, as a row name: the engine class and, for the in-process
    transformers engine, its workers and threads."""
    label = f"{engine.name} engine ({type(engine).__name__}"
    if hasattr(engine, "workers"):
        label += f", {engine.workers} worker(s) x {engine.torch_threads} torch thread(s)"
    return label + ")"


async def batch_totals(client: httpx.AsyncClient) -> tuple[float, float, float, float]:
    """(requests, batches, busy worker-seconds, workers) of the gateway's engine so far, from its
    Prometheus metrics."""
    metrics = await scrape_metrics_async(client)
    return (metrics.get("gream_engine_batch_size_sum", 0.0), metrics.get("gream_engine_batch_size_count", 0.0),
            metrics.get("gream_engine_busy_seconds_total", 0.0), metrics.get("gream_engine_workers", 1.0))


def batch_note(before: Sequence[float], after: Sequence[float], row: Row) -> str:
    """The engine's mean batch and busy share over a row, from batch_totals before and after it."""
    if after[1] <= before[1]:
        return ""
    served, batches, busy = (a - b for a, b in zip(after[:3], before[:3], strict=True))
    # Busy seconds per request times requests/s, per worker: the share of the time the engine's
    # workers were decoding (the rest they waited for the HTTP side).
    return (f", mean engine batch {served / batches:.1f}, engine busy "
            f"{busy / served * row.rps / max(1.0, after[3]):.0%} ({1000 * busy / served:.2f} worker-ms/request)")


async def bench_gateway(bundle_dir: Path, bundle: Any, histories: Sequence[Sequence[int]], engine: str,
                        dtype: str, concurrencies: Sequence[int], ready_timeout_s: float = 600,
                        extra_env: Mapping[str, str] | None = None, rounds: int = 1, window_s: float = 3.0,
                        ) -> list[tuple[Row, Row]]:
    """(bare engine, gateway) rows per concurrency. The bare engine is the gateway's own model runtime
    (built from the same settings by the same factory, always in-process: a gateway that runs it in a
    child process is charged for that too) in this process, driven by the same closed loop of callers
    without HTTP; the two take turns, round by round, so the overhead is the ratio of the two."""
    from service.engine.factory import create_local_engine
    from service.engine_settings import local_engine_config
    from service.history import InMemoryHistoryStore
    from service.recommender import Query, Recommender

    env = {**os.environ, "GREAM_DTYPE": DTYPES[dtype], "GREAM_LOG_LEVEL": "warning", "GREAM_QUEUE_MAX": "4096",
           "GREAM_DEFAULT_BEAMS": str(BEAMS), "GREAM_MAX_BATCH": "32", "GREAM_ENGINE": engine, **(extra_env or {})}
    env.pop("GREAM_REDIS_URL", None)  # the embedded in-memory history store: requests carry histories
    settings = engine_settings(bundle_dir, env)
    bare_engine = create_local_engine(local_engine_config(settings), bundle)
    bodies = [{"history": [bundle.items[i].item_id for i in h], "k": K, "exclude_seen": False} for h in histories]
    # What the gateway's recommender asks its engine for each body (prompt, history window, prior),
    # planned once, before any timing.
    recommender = Recommender(bundle, bare_engine, InMemoryHistoryStore(), history_cap=settings.history_cap,
                              drop_chunk=settings.history_drop_chunk, use_prior=settings.use_prior)
    requests = [recommender.engine_request(await recommender.plan(Query(**body), f"bare-{n}"))
                for n, body in enumerate(bodies)]

    async def bare_one(i: int) -> list[int]:
        return [it.index for it in await bare_engine.recommend(requests[i])]

    log_fd, log_name = tempfile.mkstemp(prefix="bench-gateway-", suffix=".log")
    os.close(log_fd)
    log_path = Path(log_name)
    # Started before the bare engine warms up, so the two load at the same time; no timing runs yet.
    gateway = start_gateway(bundle_dir, log_path, "--engine", engine, env=env)
    pairs: list[tuple[Row, Row]] = []
    try:
        await bare_engine.start()
        label = engine_label(bare_engine)
        await run_window("warm-up", bare_one, range(min(8, len(requests))), 8, 0.5, progress=False)
        await asyncio.to_thread(gateway.wait_ready, ready_timeout_s)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            port = int(gateway.url.rsplit(":", 1)[1])
            with LoadGenerator(port, [json.dumps(body) for body in bodies]) as loadgen:
                loadgen.run(range(min(8, len(bodies))), 8, 0.5)  # warm-up
                for c in concurrencies:
                    where = ", in a child process" if settings.use_engine_subprocess else ""
                    row = Row(f"gateway: HTTP -> {label}{where}", c, [], 0.0)
                    bare = Row(f"{label}, in-process, taking turns with the gateway", c, [], 0.0)
                    before, cpu = await batch_totals(client), 0.0
                    for part in rounds_of(len(bodies), rounds):
                        bare.add(await run_window("bare engine", bare_one, part, c, window_s))
                        measured, cpu_s = loadgen.run(part, c, window_s)
                        measured.results = [[bundle.index_of[i] for i in items] for items in measured.results]
                        row.add(measured)
                        cpu += cpu_s
                    # The machine's cores are shared with the load generator: say how much it took.
                    row.note = f"client used {cpu / row.wall_s:.2f} cores"
                    row.note += batch_note(before, await batch_totals(client), row)
                    pairs.append((bare, row))
    finally:
        await asyncio.to_thread(gateway.stop)
        await bare_engine.close()
    return pairs
