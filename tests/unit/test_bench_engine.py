"""The engine benchmark's bookkeeping: rounds cover every request once, engines take turns on them,
window runs keep the server at full concurrency, and the paired bare engine gets the gateway's
settings. Time is simulated where it matters, so nothing here depends on the machine's speed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtests.engine_bench.gateway import engine_settings
from loadtests.engine_bench.timing import rounds_of, run_async, run_interleaved, run_window
from loadtests.harness import parse_metrics


def test_rounds_cover_every_request_once() -> None:
    for n, rounds in ((256, 4), (10, 3), (3, 8), (1, 1)):
        parts = rounds_of(n, rounds)
        assert [i for part in parts for i in part] == list(range(n))
        assert len(parts) == min(n, rounds)


def test_engines_take_turns_and_keep_request_order() -> None:
    calls: list[str] = []

    def engine(name: str):  # type: ignore[no-untyped-def]
        def run(chunk):  # type: ignore[no-untyped-def]
            calls.append(name)
            return [[len(p)] for p in chunk]
        return run

    prompts = ["a" * i for i in range(1, 9)]
    rows = run_interleaved({"x": engine("x"), "y": engine("y")}, prompts, batch=2, rounds=2)
    assert calls == ["x", "x", "y", "y", "y", "y", "x", "x"]  # the order rotates each round
    for row in rows.values():
        assert row.results == [[len(p)] for p in prompts]
        assert len(row.latencies_s) == len(prompts)


class FakeServer:
    """Requests that take 1-3 ms of simulated time each; records how many were in flight when each
    one completed, and when."""

    def __init__(self) -> None:
        self.now = 0.0
        self.in_flight: list[int] = []
        self.completions: list[tuple[float, int]] = []  # (time, requests in flight)

    def clock(self) -> float:
        return self.now

    async def handle(self, i: int) -> list[int]:
        self.in_flight.append(i)
        await asyncio.sleep(0)  # the other callers send theirs
        self.now += 0.001 * (1 + i % 3)
        self.completions.append((self.now, len(self.in_flight)))
        self.in_flight.remove(i)
        return [i, i + 1]


def test_window_runs_keep_the_server_at_full_concurrency() -> None:
    """Requests that complete inside the window are the row; callers cycle over the requests, so the
    server sees `concurrency` of them for the whole window (no ramp-down, which a fixed set of
    requests has at its end), and every request's own result comes back once, in order."""
    server = FakeServer()
    row = asyncio.run(run_window("fake", server.handle, range(10, 30), 4, window_s=0.3, warm_up_s=0.1,
                                 progress=False, clock=server.clock))
    assert row.results == [[i, i + 1] for i in range(10, 30)]
    assert row.wall_s == 0.3
    in_window = [seen for at, seen in server.completions if 0.1 <= at <= 0.4]
    assert len(row.latencies_s) == len(in_window) > 20
    assert set(in_window) == {4}
    assert row.rps == len(in_window) / 0.3

    fixed = FakeServer()
    asyncio.run(run_async("fake", fixed.handle, range(10, 30), 4))
    assert [seen for _, seen in fixed.completions][-3:] == [3, 2, 1]  # what the window run avoids


def test_the_paired_bare_engine_has_the_gateways_settings(tmp_path: Path) -> None:
    """The bare row runs the engine the gateway builds from the same environment."""
    env = {"GREAM_DECODE_WORKERS": "3", "GREAM_TORCH_THREADS": "1", "GREAM_MAX_BATCH": "16",
           "GREAM_NOT_A_SETTING": "x", "PATH": "/bin"}
    settings = engine_settings(tmp_path, env)
    assert (settings.decode_workers, settings.torch_threads, settings.max_batch) == (3, 1, 16)
    assert settings.bundle == tmp_path


def test_metrics_are_parsed_with_labels_summed_away() -> None:
    text = """# HELP gream_engine_batch_size Requests per forward pass.
# TYPE gream_engine_batch_size histogram
gream_engine_batch_size_bucket{le="1.0"} 2.0
gream_engine_batch_size_bucket{le="+Inf"} 5.0
gream_engine_batch_size_count 5.0
gream_engine_batch_size_sum 40.0
# HELP gream_redis_errors_total Redis errors.
# TYPE gream_redis_errors_total counter
gream_redis_errors_total{op="get"} 2.0
gream_redis_errors_total{op="append"} 3.0
# HELP gream_engine_workers Decode workers.
# TYPE gream_engine_workers gauge
gream_engine_workers 2.0
"""
    metrics = parse_metrics(text)
    assert metrics["gream_engine_batch_size_sum"] == 40.0
    assert metrics["gream_engine_batch_size_count"] == 5.0
    assert metrics["gream_redis_errors_total"] == 5.0
    assert metrics["gream_engine_workers"] == 2.0
