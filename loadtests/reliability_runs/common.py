"""What every reliability run uses: a timestamped log line and a gateway whose log lands in the
run's output folder."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from loadtests.harness import GatewayProcess, running_gateway

# The private Redis of the redis run; never a shared one.
REDIS_PORT = 6392


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def gateway(bundle: Path, out: Path, name: str, *args: str, env: Mapping[str, str] | None = None
            ) -> Iterator[GatewayProcess]:
    """A ready gateway (JSON logs at warning level, in `out`/`name`.log) for the block."""
    environ = {"GREAM_LOG_JSON": "true", "GREAM_LOG_LEVEL": "warning", **(env or {})}
    with running_gateway(bundle, out / f"{name}.log", *args, env=environ) as server:
        yield server
