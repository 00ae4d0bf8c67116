"""The engine benchmark's bookkeeping: rounds cover every request once, engines take turns on them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

from bench_engine import rounds_of, run_interleaved


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
