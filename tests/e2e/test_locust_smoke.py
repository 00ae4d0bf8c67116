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
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never import locust in the test process: its import gevent-monkey-patches threads and sockets for
# every other test. It runs as a subprocess; here we only look for it.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (pip install locust)", allow_module_level=True)
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RUN_SECONDS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "use the in-memory store"
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def gateway(tiny_bundle_dir: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    namespace = f"gsmoke{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "GREAM_LOG_JSON": "false", "GREAM_LOG_LEVEL": "warning", "GREAM_TORCH_THREADS": "1",
           "GREAM_REDIS_NAMESPACE": namespace, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(tiny_bundle_dir), "--host", "127.0.0.1",
           "--port", str(port), "--engine", "transformers"]
    use_redis = redis_answers(REDIS_URL)
    if use_redis:
        cmd += ["--redis-url", REDIS_URL]
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"gream serve exited with {proc.returncode}:\n{(tmp_path / 'gateway.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"gateway not ready in 90 s:\n{(tmp_path / 'gateway.log').read_text()[-3000:]}")
        yield base
    finally:
        stop(proc)
        log.close()
        if use_redis:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{namespace}:*"))
            if keys:
                client.delete(*keys)
            client.close()


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
