"""CI smoke run of the locust scenarios: a real `gream serve` on a free loopback port with the tiny
bundle (the real Redis on db 15 under a namespace of its own when one answers, else the in-memory
store), locust headless for about 20 s with a few users of both classes, zero failures required.

Latency thresholds are relaxed here (CI machines are small and shared); `make loadtest` applies the
real ones.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.harness import ROOT, running_gateway
from tests.support.redis_db import REDIS_URL, delete_namespace, new_namespace, redis_answers

# Never import locust in the test process: its import gevent-monkey-patches threads and sockets for
# every other test. It runs as a subprocess; here we only look for it.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (pip install locust)", allow_module_level=True)

RUN_SECONDS = 20


@pytest.fixture
def gateway(tiny_bundle_dir: Path, tmp_path: Path) -> Iterator[str]:
    namespace = new_namespace("gsmoke")
    env = {"GREAM_LOG_JSON": "false", "GREAM_LOG_LEVEL": "warning", "GREAM_TORCH_THREADS": "1",
           "GREAM_REDIS_NAMESPACE": namespace}
    args = ["--engine", "transformers"]
    use_redis = redis_answers(REDIS_URL)
    if use_redis:
        args += ["--redis-url", REDIS_URL]
    try:
        with running_gateway(tiny_bundle_dir, tmp_path / "gateway.log", *args, env=env, ready_timeout_s=90) as server:
            yield server.url
    finally:
        if use_redis:
            delete_namespace(namespace)


def read_stats(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as fh:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}


def test_locust_smoke_has_zero_failures(gateway: str, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    env = {**os.environ, "GREAM_LOAD_K": "5", "GREAM_LOAD_REASONING_TOKENS": "8", "GREAM_LOAD_P95_MS": "30000",
           "GREAM_LOAD_TTFT_P95_MS": "30000", "GREAM_LOAD_MAX_FAILURE_RATIO": "0"}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "--host", gateway, "-u", "5", "-r", "5", "-t", f"{RUN_SECONDS}s", "--stop-timeout", "15",
           "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_SECONDS + 60)
    report = result.stdout[-4000:] + result.stderr[-4000:]
    stats = read_stats(Path(f"{prefix}_stats.csv"))
    total = stats[("", "Aggregated")]
    assert int(total["Request Count"]) > 0, report
    assert int(total["Failure Count"]) == 0, report
    assert result.returncode == 0, report
    for key in [("POST", "/v1/recommendations"), ("POST", "/v1/users/{user_id}/events"),
                ("SSE", "time to first token"), ("SSE", "stream complete")]:
        assert key in stats and int(stats[key]["Request Count"]) > 0, f"no {key} requests:\n{report}"
