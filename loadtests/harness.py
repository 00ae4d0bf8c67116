"""What the load tools and the tests share: free loopback ports, gateway and Redis processes, waiting
for `/readyz`, and reading the gateway's Prometheus metrics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout_s: float = 20) -> None:
    """Ask `proc` to stop with `sig` (SIGINT: uvicorn's graceful shutdown), kill it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_ready(url: str, *, alive: Callable[[], bool] = lambda: True, describe: Callable[[], str] = str,
               timeout_s: float = 180, interval_s: float = 0.3) -> None:
    """Poll `url`/readyz until it answers 200. Raises RuntimeError when `alive()` turns false or time
    runs out, with `describe()` (e.g. the server's log tail) in the message."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise RuntimeError(f"the server for {url} stopped before it was ready\n{describe()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} was not ready within {timeout_s:.0f} s\n{describe()}")
        time.sleep(interval_s)


@dataclass
class GatewayProcess:
    """A `gream serve` in a child process of this one, its output in `log_path`."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return f"log {self.log_path}:\n{text[-chars:]}"

    def wait_ready(self, timeout_s: float = 180) -> None:
        wait_ready(self.url, alive=lambda: self.proc.poll() is None, describe=self.log_tail, timeout_s=timeout_s)

    def rss_bytes(self) -> int:
        """Resident memory of the gateway and its children (engine processes)."""
        import psutil

        proc = psutil.Process(self.pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    def stop(self) -> None:
        stop_process(self.proc)


def start_gateway(bundle: Path, log_path: Path, *args: str, env: Mapping[str, str] | None = None,
                  port: int | None = None) -> GatewayProcess:
    """Start `python -m service.cli serve` on a loopback port; does not wait for it (see wait_ready).
    `args` are extra CLI flags; `env` is laid over this process's environment."""
    port = port or free_port()
    environ = {**os.environ, **QUIET_ENV, **(env or {})}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle), "--host", LOOPBACK,
           "--port", str(port), *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
    return GatewayProcess(proc, f"http://{LOOPBACK}:{port}", log_path)


@contextmanager
def running_gateway(bundle: Path, log_path: Path, *args: str, env: Mapping[str, str] | None = None,
                    ready_timeout_s: float = 180) -> Iterator[GatewayProcess]:
    """A gateway process, ready, for the block; stopped afterwards."""
    gateway = start_gateway(bundle, log_path, *args, env=env)
    try:
        gateway.wait_ready(ready_timeout_s)
        yield gateway
    finally:
        gateway.stop()


def start_redis(port: int, workdir: Path | None = None, log_path: Path | None = None,
                timeout_s: float = 5) -> subprocess.Popen[bytes]:
    """A private `redis-server` on 127.0.0.1:`port` without persistence, once it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found")
    if port_open(port):
        raise RuntimeError(f"something already listens on {LOOPBACK}:{port}")
    cmd = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    if workdir is not None:
        cmd += ["--dir", str(workdir)]
    if log_path is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    else:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(port):
            return proc
        time.sleep(0.02)
    stop_process(proc, signal.SIGTERM)
    raise RuntimeError(f"redis-server did not start on port {port}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {sample name: value}, label sets summed away (enough for the
    counters, gauges and histogram _sum/_count series the tools read)."""
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def scrape_metrics(url: str, timeout_s: float = 5) -> dict[str, float]:
    """The gateway's /metrics at `url`, parsed by parse_metrics."""
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=timeout_s).text)


async def scrape_metrics_async(client: httpx.AsyncClient) -> dict[str, float]:
    """/metrics through `client` (its base_url is the gateway), parsed by parse_metrics."""
    return parse_metrics((await client.get("/metrics")).text)
