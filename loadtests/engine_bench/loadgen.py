"""The gateway rows' client, in a process of its own so that it shares neither an interpreter nor a
GIL with the paired bare engine. One process for all rounds (connections stay open); the benchmark
sends each round's requests, concurrency and window as a JSON line on stdin, and it answers with the
round (latencies, item ids, its own CPU time) as one JSON line on stdout.

    python -m loadtests.engine_bench.loadgen PORT      (started by LoadGenerator)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Self

import h11

from loadtests.engine_bench.rows import Row
from loadtests.engine_bench.timing import run_window
from loadtests.harness import LOOPBACK, ROOT


class KeepAliveClient:
    """HTTP/1.1 keep-alive over asyncio streams (h11 frames the messages), one connection per request
    in flight, pre-encoded bodies. It shares the machine's cores with the gateway, so it must cost
    little CPU: measured against the tiny bundle's gateway at 32 in flight on 2 cores, it takes
    0.15 CPU-ms per request where httpx's AsyncClient takes 2.2-2.9 ms (0.5-0.75 cores taken from
    the gateway, whose req/s fell to about half)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: list[tuple[h11.Connection, asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connection(self) -> tuple[h11.Connection, asyncio.StreamReader, asyncio.StreamWriter, bool]:
        if self._idle:
            conn, reader, writer = self._idle.pop()
            conn.start_next_cycle()
            return conn, reader, writer, True
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return h11.Connection(h11.CLIENT), reader, writer, False

    async def post(self, path: str, body: bytes) -> bytes:
        """POST a JSON body; the response body of a 200 (anything else raises)."""
        headers = [("Host", self.host), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        while True:
            conn, reader, writer, reused = await self._connection()
            writer.write(conn.send(h11.Request(method="POST", target=path, headers=headers))
                         + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            try:
                status, data = await self._response(conn, reader)
                break
            except (h11.RemoteProtocolError, ConnectionError):
                writer.close()
                if not reused:
                    raise
                # else: the server's keep-alive timeout closed this idle connection; take another
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            self._idle.append((conn, reader, writer))
        else:
            writer.close()
        if status != 200:
            raise RuntimeError(f"gateway answered {status}: {data[:300]!r}")
        return data

    @staticmethod
    async def _response(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        status, chunks = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the gateway closed the connection")

    async def close(self) -> None:
        for _, _, writer in self._idle:
            writer.close()
        self._idle.clear()


class LoadGenerator:
    """The parent's handle on the load generator process (see the module's docstring)."""

    def __init__(self, port: int, bodies: Sequence[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtests.engine_bench.loadgen", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        self._send({"bodies": list(bodies)})

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def run(self, indices: Sequence[int], concurrency: int, window_s: float, warm_up_s: float = 0.5
            ) -> tuple[Row, float]:
        """One round (run_window) over the requests `indices`; the row and the client's CPU seconds."""
        assert self.proc.stdout is not None
        self._send({"indices": list(indices), "concurrency": concurrency, "window_s": window_s,
                    "warm_up_s": warm_up_s})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {self.proc.wait()}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"load generator: {out['error']}")
        return Row("gateway", concurrency, out["latencies_s"], out["wall_s"], out["results"]), out["cpu_s"]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self._send({"quit": True})
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve_rounds(port: int) -> int:
    """The load generator process: rounds on request, until told to quit."""
    bodies = [b.encode() for b in json.loads(sys.stdin.readline())["bodies"]]
    loop = asyncio.new_event_loop()
    client = KeepAliveClient(LOOPBACK, port)

    async def one(i: int) -> list[str]:
        return [it["item_id"] for it in json.loads(await client.post("/v1/recommendations", bodies[i]))["items"]]

    for line in sys.stdin:
        message = json.loads(line)
        if message.get("quit"):
            break
        try:
            t_cpu = time.process_time()
            row = loop.run_until_complete(run_window("gateway", one, message["indices"], message["concurrency"],
                                                     message["window_s"], message["warm_up_s"], progress=False))
            reply = {"latencies_s": row.latencies_s, "wall_s": row.wall_s, "results": row.results,
                     "cpu_s": time.process_time() - t_cpu}
        except Exception as exc:  # noqa: BLE001 (reported to the benchmark, which raises it)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    loop.run_until_complete(client.close())
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve_rounds(int(sys.argv[1])))
