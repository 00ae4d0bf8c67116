"""A benchmark row (one engine at one concurrency) and the table that compares rows to the reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

K = 10
BEAMS = 10
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class Row:
    engine: str
    concurrency: int
    latencies_s: list[float]
    wall_s: float
    results: list[list[Any]] = field(default_factory=list)
    note: str = ""

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else float("nan")

    def pct(self, q: float) -> float:
        """The q-th percentile of the latencies, in milliseconds."""
        return float(np.percentile(np.asarray(self.latencies_s) * 1000.0, q)) if self.latencies_s else float("nan")

    def add(self, part: Row) -> None:
        """Append another round of the same engine and concurrency."""
        self.latencies_s += part.latencies_s
        self.results += part.results
        self.wall_s += part.wall_s


def agreement(row: Row, ref: Row | None) -> float | None:
    """The share of requests whose top-k (same items, same order) equals the reference's."""
    if ref is None or not row.results or len(row.results) != len(ref.results):
        return None
    return sum(a == b for a, b in zip(row.results, ref.results, strict=True)) / len(ref.results)


def table(rows: Sequence[Row], refs: dict[int, Row]) -> str:
    """A Markdown table of the rows, with ratios to the reference at the same concurrency."""
    head = ["engine", "conc.", "req/s", "p50 ms", "p99 ms", "x ref req/s", "same top-10 as ref", "note"]
    lines = [head]
    for r in rows:
        ref = refs.get(r.concurrency)
        ratio = f"{r.rps / ref.rps:.2f}x" if ref is not None and ref.rps > 0 else "-"
        agree = agreement(r, ref)
        lines.append([r.engine, str(r.concurrency), f"{r.rps:.2f}", f"{r.pct(50):.1f}", f"{r.pct(99):.1f}", ratio,
                      "-" if agree is None else f"{agree:.3f}", r.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines[1:])])


def gateway_share_lines(pairs: Sequence[tuple[Row, Row]]) -> list[str]:
    """Per (bare engine, gateway) pair: the gateway's share of the bare engine's requests/s."""
    out = []
    for bare, gateway in pairs:
        share = gateway.rps / bare.rps if bare.rps > 0 else float("nan")
        latency = gateway.pct(50) / bare.pct(50) if bare.pct(50) > 0 else float("nan")
        out.append(f"gateway at concurrency {gateway.concurrency}: {share * 100:.0f} % of its bare engine's req/s, "
                   f"p50 x{latency:.2f} (target: >= 87 % of the req/s, i.e. <= 15 % overhead)")
    return out


def rows_json(rows: Sequence[Row], refs: dict[int, Row]) -> list[dict[str, Any]]:
    return [{"engine": r.engine, "concurrency": r.concurrency, "rps": round(r.rps, 3),
             "p50_ms": round(r.pct(50), 2), "p99_ms": round(r.pct(99), 2),
             "same_top10_as_reference": agreement(r, refs.get(r.concurrency))} for r in rows]
