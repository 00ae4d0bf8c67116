"""A private Redis stopped and restarted under load: requests carrying their history never fail,
/readyz says degraded while it is down, and cached/event requests recover on the same process."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from loadtests.harness import start_redis, stop_process
from loadtests.reliability_runs.common import REDIS_PORT, gateway, log
from loadtests.reliability_runs.load import Load, Sample, histories, item_ids


def run_redis(bundle: Path, out: Path, phase_seconds: float = 12.0, concurrency: int = 4) -> dict[str, Any]:
    redis = start_redis(REDIS_PORT, out, out / "redis.log")
    try:
        with gateway(bundle, out, "redis-gateway", "--redis-url", f"redis://127.0.0.1:{REDIS_PORT}/0") as server:
            load = Load(server.url, histories(bundle), item_ids(bundle), mix={"direct": 2, "cached": 1, "events": 1},
                        users=200)
            pid = server.pid
            ready_log: list[tuple[float, str]] = []
            phases: dict[str, tuple[float, float]] = {}
            t0 = time.monotonic()

            async def readiness() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
                    while time.monotonic() - t0 < 3 * phase_seconds + 1:
                        try:
                            state = (await client.get("/readyz")).json()["status"]
                        except (httpx.HTTPError, ValueError, KeyError):
                            state = "error"
                        ready_log.append((time.monotonic() - t0, state))
                        await asyncio.sleep(0.5)

            async def chaos() -> None:
                nonlocal redis
                phases["before"] = (0, phase_seconds)
                await asyncio.sleep(phase_seconds)
                log("redis: stopping the private redis-server")
                redis.send_signal(signal.SIGTERM)
                await asyncio.to_thread(redis.wait, 10)
                down_at = time.monotonic() - t0
                await asyncio.sleep(phase_seconds)
                log("redis: restarting it")
                redis = await asyncio.to_thread(start_redis, REDIS_PORT, out, out / "redis.log")
                up_at = time.monotonic() - t0
                phases["down"] = (down_at, up_at)
                phases["after"] = (up_at, 3 * phase_seconds)

            async def main() -> None:
                await asyncio.gather(load.run(concurrency, 3 * phase_seconds), readiness(), chaos())

            asyncio.run(main())
            same_process = server.proc.poll() is None and server.pid == pid
            # one more check after the run: everything answers again, on the same process
            after = httpx.post(f"{server.url}/v1/users/rel-check/events", json={"events": [{"item_id": load.items[0]}]},
                               timeout=10).status_code
    finally:
        stop_process(redis, signal.SIGTERM)
    return _report(load.samples, ready_log, phases, t0, phase_seconds, concurrency, same_process, after)


def _report(samples: list[Sample], ready_log: list[tuple[float, str]], phases: dict[str, tuple[float, float]],
            t0: float, phase_seconds: float, concurrency: int, same_process: bool, after: int) -> dict[str, Any]:
    report: dict[str, Any] = {"run": "redis", "phase_seconds": phase_seconds, "concurrency": concurrency, "phases": {}}
    for name, (a, b) in phases.items():
        in_phase = [s for s in samples if a <= s.start - t0 < b]  # by send time
        report["phases"][name] = {kind: dict(sorted(Counter(str(s.status) for s in in_phase if s.kind == kind).items()))
                                  for kind in ("direct", "cached", "events")}
        report["phases"][name]["readyz"] = sorted({st for t, st in ready_log if a <= t < b})
    up_at = phases["after"][0]
    recovered: dict[str, float | None] = {}
    for kind in ("events", "cached"):
        ok = [s.at - t0 - up_at for s in samples if s.kind == kind and s.start - t0 >= up_at and 200 <= s.status < 300]
        recovered[f"{kind}_first_2xx_s"] = round(min(ok), 2) if ok else None
    ready_after = [t - up_at for t, st in ready_log if t >= up_at and st == "ready"]
    recovered["readyz_ready"] = round(min(ready_after), 2) if ready_after else None
    direct_5xx = sum(1 for s in samples if s.kind == "direct" and (s.status >= 500 or s.status == 0))
    late = [s for s in samples if s.start - t0 >= up_at + 3 and s.kind in ("cached", "events")]
    late_bad = sum(1 for s in late if not 200 <= s.status < 300)
    report["late_errors"] = [{"kind": s.kind, "status": s.status, "sent_s_after_restart": round(s.start - t0 - up_at, 2),
                              "seconds": round(s.seconds, 3)} for s in late if not 200 <= s.status < 300][:20]
    degraded_seen = "degraded" in report["phases"]["down"]["readyz"]
    report.update({"history_carrying_5xx": direct_5xx, "recovery_after_restart_s": recovered,
                   "errors_3s_after_restart": late_bad, "readyz_degraded_while_down": degraded_seen,
                   "gateway_not_restarted": same_process, "post_run_event_status": after,
                   "criteria": "no 5xx for requests carrying their history; /readyz degraded while down; "
                               "cached/events 2xx again within 3 s of the restart on the same process"})
    report["passed"] = bool(direct_5xx == 0 and degraded_seen and same_process and late_bad == 0 and after == 202)
    shown = ("history_carrying_5xx", "recovery_after_restart_s", "errors_3s_after_restart",
             "readyz_degraded_while_down", "gateway_not_restarted", "passed")
    log(f"redis: {json.dumps({k: report[k] for k in shown})}")
    return report
