"""The engine benchmark's bookkeeping: rounds cover every request once, engines take turns on them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

from bench_engine import rounds_of, run_interleaved, run_window


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
        assert len(row.latencies_s) == len(prompts) and row.wall_s > 0


def test_window_runs_keep_the_server_at_full_concurrency() -> None:
    """Requests that complete inside the window are the row; callers cycle over the requests, so the
    server sees `concurrency` of them for the whole window (no ramp-down, which a fixed set of
    requests has at its end), and every request's own result comes back once, in order."""
    import asyncio

    from bench_engine import run_async

    def run(runner: object, *extra: float) -> tuple[object, list[int], list[float]]:
        in_flight: list[int] = []
        at_completion: list[int] = []
        ends: list[float] = []

        async def fn(i: int) -> list[int]:
            in_flight.append(i)
            await asyncio.sleep(0.002 * (1 + i % 3))
            at_completion.append(len(in_flight))
            ends.append(time.perf_counter())
            in_flight.remove(i)
            return [i, i + 1]

        t0 = time.perf_counter()
        row = asyncio.run(runner("fake", fn, range(10, 30), 4, *extra))  # type: ignore[operator]
        return row, at_completion, [e - t0 for e in ends]

    row, seen, ends = run(run_window, 0.3, 0.1)
    assert row.results == [[i, i + 1] for i in range(10, 30)]  # type: ignore[attr-defined]
    assert row.wall_s == 0.3  # type: ignore[attr-defined]
    in_window = [e for e in ends if 0.1 <= e <= 0.4]
    assert len(row.latencies_s) == pytest.approx(len(in_window), abs=4)  # type: ignore[attr-defined]
    assert all(0 < t < 0.1 for t in row.latencies_s)  # type: ignore[attr-defined]
    # 4 callers, 2-6 ms each (mean 4 ms): about 1000 requests/s, whatever the request count.
    assert 500 < row.rps < 1100  # type: ignore[attr-defined]
    window_seen = [n for n, e in zip(seen, ends, strict=True) if 0.1 <= e <= 0.4]
    assert set(window_seen) == {4}
    _, plain, _ = run(run_async)
    assert plain[-3:] == [3, 2, 1]  # what the window run avoids


def test_the_paired_bare_engine_has_the_gateways_settings(tmp_path: Path) -> None:
    """The bare row runs the engine the gateway builds from the same environment."""
    from bench_engine import engine_settings

    env = {"GREAM_ENGINE_WORKERS": "3", "GREAM_TORCH_THREADS": "1", "GREAM_MAX_BATCH": "16",
           "GREAM_NOT_A_SETTING": "x", "PATH": "/bin"}
    settings = engine_settings(tmp_path, env)
    assert (settings.engine_workers, settings.torch_threads, settings.max_batch) == (3, 1, 16)
    assert settings.bundle == tmp_path
