"""Live rollout under locust: a gateway follows a registry while locust runs at a fixed concurrency;
two swaps happen in the middle (to a version built with `add_items`, then back). Reports failures,
the p99 of direct recommendations inside the swap windows against outside them, and the gateway's
peak memory (its process tree) during the swaps against before them.

    python loadtests/rollout_run.py --bundle var/demo-bundle --users 16 --seconds 60

Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness import QUIET_ENV, ROOT, running_gateway
from model_store.builder import add_items
from model_store.catalog import Item
from model_store.registry import Registry

ADMIN_KEY = "rollout-admin-key"


def build_registry(bundle: Path, out: Path) -> tuple[Registry, str, str]:
    """The bundle as v1 (current) and v2 = v1 plus a few new items."""
    reg = Registry(out / "registry")
    new = [Item(item_id=f"rollout-new-{i}", title=f"Rollout test item {i}", brand="Acme",
                categories="Industrial > Test", description="Added by loadtests/rollout_run.py.") for i in range(5)]
    v2_dir, _ = add_items(bundle, new, out / "v2", overwrite=True, log=lambda *a: None)
    return reg, reg.publish(bundle, activate=True), reg.publish(v2_dir)


class MemorySampler(threading.Thread):
    """RSS of a process and its children, sampled every 0.1 s, with the time of each sample."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [self.proc, *self.proc.children(recursive=True)])
            except psutil.Error:
                rss = 0
            self.samples.append((time.time(), rss / 2**20))
            time.sleep(0.1)

    def peak(self, start: float, end: float) -> float:
        return max((mb for t, mb in self.samples if start <= t <= end), default=0.0)


def swap(url: str, reg: Registry, version: str) -> tuple[float, float]:
    """Activate `version` and ask the gateway to load it now; the swap's (start, end) times."""
    start = time.time()
    reg.activate(version)
    resp = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
    resp.raise_for_status()
    if resp.json()["model_version"] != version:
        raise RuntimeError(f"reload did not serve {version}: {resp.text}")
    return start, time.time()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def analyse(log_path: Path, windows: list[tuple[float, float]]) -> dict[str, float | int]:
    rows = list(csv.DictReader(log_path.open(encoding="utf-8")))
    inside, outside = [], []
    for row in rows:
        if row["name"] != "/v1/recommendations" or row["type"] != "POST":
            continue
        # A request overlaps a window when it ended after the window opened and started before it closed.
        end, ms = float(row["end_s"]), float(row["ms"])
        hit = any(end >= a and end - ms / 1000 <= b for a, b in windows)
        (inside if hit else outside).append(ms)
    return {"requests": len(rows), "failures": sum(1 for r in rows if r["error"]),
            "direct_in_swaps": len(inside), "direct_outside": len(outside),
            "p99_ms_in_swaps": round(percentile(inside, 99), 1), "p99_ms_outside": round(percentile(outside, 99), 1),
            "p50_ms_in_swaps": round(percentile(inside, 50), 1), "p50_ms_outside": round(percentile(outside, 50), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "demo-bundle")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "rollout-run")
    parser.add_argument("--users", type=int, default=16, help="locust users (the knee concurrency)")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--swaps-at", default="20,40", help="seconds into the run of the two swaps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reg, v1, v2 = build_registry(args.bundle, args.out)
    at = [float(s) for s in args.swaps_at.split(",")]
    env = {"GREAM_ADMIN_API_KEY": ADMIN_KEY, "GREAM_REGISTRY_POLL_S": "3600"}  # swaps come from the driver
    with running_gateway(args.bundle, args.out / "gateway.log", "--registry", str(reg.root), env=env) as gw:
        memory = MemorySampler(gw.proc.pid)
        memory.start()
        request_log = args.out / "requests.csv"
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "--host", gw.url, "-u", str(args.users), "-r", str(args.users), "-t", f"{args.seconds}s",
             "--stop-timeout", "30", "--only-summary", "--request-log", str(request_log)],
            cwd=ROOT, env={**os.environ, **QUIET_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.time()
        windows = []
        for when, version in zip(at, (v2, v1)):
            time.sleep(max(0.0, started + when - time.time()))
            windows.append(swap(gw.url, reg, version))
        locust.wait(timeout=args.seconds + 120)
        memory.stop.set()
        ready = httpx.get(f"{gw.url}/readyz").json()
    report = {**analyse(request_log, windows), "users": args.users, "seconds": args.seconds,
              "swap_s": [round(b - a, 2) for a, b in windows], "locust_exit": locust.returncode,
              "rss_mb_before_swaps": round(memory.peak(started, windows[0][0]), 1),
              "rss_mb_peak_in_swaps": round(max(memory.peak(a, b + 1) for a, b in windows), 1),
              "rss_mb_after": round(memory.samples[-1][1], 1) if memory.samples else None,
              "served_after": ready["model_version"], "loaded_after": ready["loaded_versions"]}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
