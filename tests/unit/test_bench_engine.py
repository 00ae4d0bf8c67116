"""The engine benchmark's bookkeeping: rounds cover every request once, engines take turns on them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

from bench_engine import rounds_of, run_interleaved, run_steady


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


def test_steady_runs_keep_the_server_at_full_concurrency() -> None:
    """Every measured request comes back with its own result, and the server sees `concurrency`
    callers until the last measured one ends (warm-up before, filler after): no ramp-down, which a
    plain closed-loop run has in its last requests."""
    import asyncio

    from bench_engine import run_async

    def run(runner: object) -> tuple[object, list[int]]:
        in_flight: list[int] = []
        at_completion: list[int] = []

        async def fn(i: int) -> list[int]:
            in_flight.append(i)
            await asyncio.sleep(0.001 * (1 + i % 3))
            at_completion.append(len(in_flight))
            in_flight.remove(i)
            return [i, i + 1]

        return asyncio.run(runner("fake", fn, range(10, 30), 4)), at_completion  # type: ignore[operator]

    row, seen = run(run_steady)
    assert row.results == [[i, i + 1] for i in range(10, 30)]  # type: ignore[attr-defined]
    assert len(row.latencies_s) == 20 and all(t > 0 for t in row.latencies_s) and row.wall_s > 0  # type: ignore[attr-defined]
    assert seen[:20] == [4] * 20
    _, plain = run(run_async)
    assert plain[-3:] == [3, 2, 1]  # what the steady run avoids
