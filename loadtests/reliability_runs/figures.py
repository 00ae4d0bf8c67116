"""Locust figures: the direct and streaming scenarios at a few user counts, one gateway for all."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtests.harness import ROOT
from loadtests.reliability_runs.common import gateway, log

SCENARIOS = (("direct", ["ProductBackend", "--tags", "direct"], [("POST", "/v1/recommendations")]),
             ("streaming", ["StreamingClient"], [("POST", "/v1/recommendations/stream"),
                                                 ("SSE", "time to first token"), ("SSE", "stream complete")]))


def run_figures(bundle: Path, out: Path, seconds: int, users: tuple[int, ...] = (1, 8, 32),
                scenarios: tuple[str, ...] = ("direct", "streaming")) -> dict[str, Any]:
    rows = []
    data = bundle.parent / f"{bundle.name}-data" / "test.jsonl"
    # 32 streaming users exceed the default reasoning concurrency (16: the rest get 429 + Retry-After);
    # the figures measure the engine, so the cap is raised to the largest user count.
    with gateway(bundle, out, "figures-gateway", env={"GREAM_MAX_CONCURRENT_REASONING": str(max(users))}) as server:
        for scenario, args, names in SCENARIOS:
            if scenario not in scenarios:
                continue
            for u in users:
                prefix = out / f"locust-{scenario}-{u}"
                env = {**os.environ, "GREAM_LOAD_P95_MS": "0", "GREAM_LOAD_TTFT_P95_MS": "0",
                       "GREAM_LOAD_MAX_FAILURE_RATIO": "1"}
                if data.is_file():
                    env["GREAM_LOAD_HISTORIES"] = str(data)
                cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
                       "--host", server.url, "-u", str(u), "-r", str(u), "-t", f"{seconds}s", "--stop-timeout", "30",
                       "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", *args]
                subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, timeout=seconds + 120)
                with open(f"{prefix}_stats.csv", newline="") as fh:
                    stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
                for key in names:
                    r = stats.get(key)
                    if r is None:
                        continue
                    row = {"scenario": scenario, "users": u, "name": f"{key[0]} {key[1]}",
                           "requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                           "rps": round(float(r["Requests/s"]), 2), "p50_ms": float(r["50%"]),
                           "p95_ms": float(r["95%"]), "p99_ms": float(r["99%"])}
                    rows.append(row)
                    log(f"figures: {scenario:>9} u={u:<3} {row['name']:<36} {row['rps']:7.2f} req/s "
                        f"p50 {row['p50_ms']:.0f} p95 {row['p95_ms']:.0f} p99 {row['p99_ms']:.0f} ms "
                        f"failures {row['failures']}/{row['requests']}")
    return {"run": "figures", "seconds": seconds, "rows": rows, "passed": all(r["failures"] == 0 for r in rows)}
