"""The reliability runs' load generator: a closed loop of httpx callers sending a weighted mix of
direct (history-carrying), cached (user_id) and event requests, and the summary of what came back."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def item_ids(bundle: Path) -> list[str]:
    with (bundle / "items.jsonl").open() as fh:
        return [str(json.loads(line)["item_id"]) for line in fh if line.strip()]


def histories(bundle: Path, n: int = 2000, seed: int = 0) -> list[list[str]]:
    """The demo data's test histories when they sit beside the bundle, else random ones."""
    data = bundle.parent / f"{bundle.name}-data" / "test.jsonl"
    ids = item_ids(bundle)
    known = set(ids)
    if data.is_file():
        rows = [json.loads(line) for line in data.open() if line.strip()][:n]
        out = [[str(i) for i in r["history"] if str(i) in known] for r in rows]
        out = [h for h in out if h]
        if out:
            return out
    rng = random.Random(seed)
    return [rng.sample(ids, rng.randint(1, min(10, len(ids)))) for _ in range(n)]


@dataclass
class Sample:
    kind: str
    status: int  # 0 = transport error
    seconds: float
    at: float  # monotonic time of completion
    start: float = 0.0  # monotonic time the request was sent


@dataclass
class Load:
    url: str
    hist: list[list[str]]
    items: list[str]
    mix: dict[str, int] = field(default_factory=lambda: {"direct": 1})
    k: int = 10
    users: int = 1000
    samples: list[Sample] = field(default_factory=list)

    def body(self, kind: str) -> tuple[str, dict[str, Any]]:
        if kind == "direct":
            return "/v1/recommendations", {"history": random.choice(self.hist), "k": self.k}
        user = f"rel-{random.randrange(self.users)}"
        if kind == "cached":
            return "/v1/recommendations", {"user_id": user, "k": self.k}
        if kind == "events":
            return f"/v1/users/{user}/events", {"events": [{"item_id": random.choice(self.items)}]}
        raise ValueError(kind)

    async def run(self, concurrency: int, seconds: float) -> list[Sample]:
        """`concurrency` callers for `seconds`; the samples (also kept in self.samples)."""
        kinds = [k for k, w in self.mix.items() for _ in range(w)]
        stop_at = time.monotonic() + seconds
        out: list[Sample] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            async def caller() -> None:
                while time.monotonic() < stop_at:
                    kind = random.choice(kinds)
                    path, body = self.body(kind)
                    t0 = time.monotonic()
                    try:
                        status = (await client.post(path, json=body)).status_code
                    except httpx.HTTPError:
                        status = 0
                    t1 = time.monotonic()
                    out.append(Sample(kind, status, t1 - t0, t1, t0))

            await asyncio.gather(*(caller() for _ in range(concurrency)))
        self.samples += out
        return out


def summarize(samples: list[Sample], seconds: float) -> dict[str, Any]:
    """Requests, 2xx, 2xx per second, latency percentiles of the 2xx, and the statuses seen."""
    lat = sorted(s.seconds * 1000 for s in samples if 200 <= s.status < 300)
    statuses = Counter(s.status for s in samples)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {"requests": len(samples), "ok": ok, "rps": round(ok / seconds, 2), "p50_ms": pct(0.50),
            "p95_ms": pct(0.95), "p99_ms": pct(0.99), "statuses": {str(k): v for k, v in sorted(statuses.items())}}
