"""A local engine in a child process of the gateway (the default for the transformers
engine, whose beam loop is Python, while vLLM's AsyncLLM already decodes in a process of its own).

In one process the gateway's event loop (HTTP parsing, validation, JSON) and the engine's decoding loop
(beam bookkeeping between torch calls) take turns on one GIL, and the engine waits whenever the loop
holds it: on 2 cores that cost the gateway a third of its engine's throughput at concurrency 32. Here
the engine (transformers or vLLM, built by the same factory) runs in a child process with its own
interpreter, and the two talk over a socket pair in length-prefixed pickle frames (a trusted peer:
our own child). The gateway side is an `Engine` like the others, so the gateway does not know.

Wire protocol (tuples; `wid` is this process's own id of a call, request ids may repeat):

    parent -> child   ("topk", wid, EngineRequest)  ("reason", wid, EngineRequest, max_tokens)  ("cancel", wid)
    child -> parent   ("ready", bundle_version) | ("failed", message)
                      ("items", wid, [(index, score)])  ("delta", wid, text)  ("done", wid, items, tokens)
                      ("error", wid, kind, message, retry_after)   kind: "overloaded" | "unavailable"
                      ("batch", size)  ("stats", queue_depth, running, extra)

The child exits when the socket closes (the gateway stopped or died). If the child dies, every call in
flight fails with EngineUnavailable (503), `ready` turns false, and a new child is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import signal
import socket
import struct
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from model_store.bundle import Bundle
from service.engine.base import (
    Engine,
    EngineOverloaded,
    EngineRequest,
    EngineStats,
    EngineUnavailable,
    ReasoningDelta,
    ReasoningDone,
    ScoredItem,
)
from service.engine.config import LocalEngineConfig, ProcessOptions

log = logging.getLogger("gream.engine.process")

_HEADER = struct.Struct("!I")
STATS_INTERVAL_S = 0.5


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))  # type: ignore[no-any-return]
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _pairs(items: list[ScoredItem]) -> list[tuple[int, float]]:
    return [(i.index, i.score) for i in items]


def _items(pairs: list[tuple[int, float]]) -> list[ScoredItem]:
    return [ScoredItem(index=i, score=s) for i, s in pairs]


def _error(kind: str, message: str, retry_after: float) -> Exception:
    if kind == "overloaded":
        return EngineOverloaded(message, retry_after=retry_after)
    return EngineUnavailable(message)


# ------------------------------------------------------------------ gateway side
class ProcessEngine(Engine):
    def __init__(self, bundle: Bundle, config: LocalEngineConfig, options: ProcessOptions | None = None):
        self.config = config  # the child builds its engine from it
        self.options = options or ProcessOptions()
        self.bundle = bundle
        self.name = f"{config.kind}-process"
        self.start_timeout_s = self.options.start_timeout_s
        self.restart_backoff_s = self.options.restart_backoff_s
        self.on_batch: Callable[[int, float], None] | None = None  # metrics hook, as the in-process engines have
        self.restarts = 0
        self._proc: Any = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[list[ScoredItem]]] = {}
        self._streams: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        self._wids = itertools.count()
        self._stats = EngineStats()
        self._ready = False
        self._closing = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def ready(self) -> bool:
        return self._ready

    def stats(self) -> EngineStats:
        return self._stats

    async def start(self) -> None:
        if self._ready:
            return
        self._closing = False
        await self._spawn()

    async def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and torch state
        ours, theirs = socket.socketpair()
        proc = ctx.Process(target=child_main, args=(theirs, str(self.bundle.path), self.config, self.options),
                           name="gream-engine", daemon=True)
        proc.start()
        theirs.close()
        self._proc = proc
        reader, self._writer = await asyncio.open_connection(sock=ours)
        try:
            first = await asyncio.wait_for(_read_frame(reader), self.start_timeout_s)
        except TimeoutError:
            await self._stop(grace_s=0)
            raise EngineUnavailable(f"engine process did not start within {self.start_timeout_s:.0f} s") from None
        if first is None or first[0] != "ready":
            await self._stop(grace_s=0)
            detail = first[1] if first else f"exit code {proc.exitcode}"
            raise EngineUnavailable(f"engine process failed to start: {detail}")
        if first[1] != self.bundle.version:
            await self._stop(grace_s=0)
            raise EngineUnavailable(f"engine process loaded bundle {first[1]}, the gateway {self.bundle.version}")
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="gream-engine-process-reader")
        self._ready = True
        log.info("engine process ready", extra={"pid": proc.pid, "engine": self.config.kind})

    async def _stop(self, grace_s: float) -> None:
        """Close our end of the socket (the child exits on end of stream), wait `grace_s`, then kill.
        The joins run off the event loop."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        await asyncio.to_thread(proc.join, grace_s)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)

    async def close(self) -> None:
        self._closing = True
        self._ready = False
        for task in (self._restart_task, self._reader_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_all(EngineUnavailable("engine was shut down"))
        await self._stop(grace_s=10)

    # ------------------------------------------------------------------ calls
    def _send(self, message: tuple[Any, ...]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise EngineUnavailable("engine process is not running")
        self._writer.write(_frame(message))

    async def recommend(self, request: EngineRequest) -> list[ScoredItem]:
        if not self._ready:
            raise EngineUnavailable("engine is not ready")
        wid = next(self._wids)
        future: asyncio.Future[list[ScoredItem]] = asyncio.get_running_loop().create_future()
        self._calls[wid] = future
        try:
            self._send(("topk", wid, request))
            return await future
        except asyncio.CancelledError:
            with contextlib.suppress(EngineUnavailable):
                self._send(("cancel", wid))
            raise
        finally:
            self._calls.pop(wid, None)

    async def reason(self, request: EngineRequest, max_reasoning_tokens: int
                     ) -> AsyncIterator[ReasoningDelta | ReasoningDone]:
        if not self._ready:
            raise EngineUnavailable("engine is not ready")
        wid = next(self._wids)
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._streams[wid] = queue
        finished = False
        try:
            self._send(("reason", wid, request, max_reasoning_tokens))
            while True:
                message = await queue.get()
                if message[0] == "delta":
                    yield ReasoningDelta(message[2])
                elif message[0] == "done":
                    finished = True
                    yield ReasoningDone(_items(message[2]), message[3], message[4])
                    return
                else:  # "error"
                    finished = True
                    raise _error(*message[2:5])
        finally:
            self._streams.pop(wid, None)
            if not finished:  # the consumer went away: abort the child's generation
                with contextlib.suppress(EngineUnavailable):
                    self._send(("cancel", wid))

    # ------------------------------------------------------------------ child -> parent
    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while (message := await _read_frame(reader)) is not None:
            kind = message[0]
            if kind == "items":
                future = self._calls.get(message[1])
                if future is not None and not future.done():
                    future.set_result(_items(message[2]))
            elif kind in ("delta", "done"):
                queue = self._streams.get(message[1])
                if queue is not None:
                    queue.put_nowait(message)
            elif kind == "error":
                future = self._calls.get(message[1])
                if future is not None and not future.done():
                    future.set_exception(_error(*message[2:5]))
                elif (queue := self._streams.get(message[1])) is not None:
                    queue.put_nowait(message)
            elif kind == "batch":
                if self.on_batch is not None:
                    self.on_batch(message[1], message[2])
            elif kind == "stats":
                self._stats = EngineStats(queue_depth=message[1], running=message[2], extra=message[3])
        self._ready = False
        if self._closing:
            return
        code = None
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 5)
            code = self._proc.exitcode
        log.error("engine process exited; failing its calls and starting a new one",
                  extra={"exit_code": code, "in_flight": len(self._calls) + len(self._streams)})
        self._fail_all(EngineUnavailable(f"engine process exited (code {code})"))
        self._restart_task = asyncio.create_task(self._restart(), name="gream-engine-process-restart")

    def _fail_all(self, exc: EngineUnavailable) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(exc)
        for queue in self._streams.values():
            queue.put_nowait(("error", -1, "unavailable", str(exc), 0.0))

    async def _restart(self) -> None:
        delay = self.restart_backoff_s
        while not self._closing:
            await asyncio.sleep(delay)
            await self._stop(grace_s=0)
            try:
                await self._spawn()
                self.restarts += 1
                return
            except EngineUnavailable as exc:
                log.error("engine process restart failed", extra={"error": str(exc)})
                delay = min(30.0, delay * 2)


# ------------------------------------------------------------------ child side
def child_main(sock: socket.socket, bundle_dir: str, config: LocalEngineConfig, options: ProcessOptions) -> None:
    """Entry point of the engine process (multiprocessing spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the gateway, which closes us in order
    from service.runtime import configure_logging

    configure_logging(options.log_json, options.log_level)
    asyncio.run(_ChildServer(sock, bundle_dir, config).run())


class _ChildServer:
    def __init__(self, sock: socket.socket, bundle_dir: str, config: LocalEngineConfig):
        self.sock, self.bundle_dir, self.config = sock, bundle_dir, config
        self.writer: asyncio.StreamWriter | None = None
        self.engine: Engine | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def send(self, message: tuple[Any, ...]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(_frame(message))

    async def run(self) -> None:
        from model_store.bundle import load_bundle
        from service.engine.factory import create_local_engine

        reader, self.writer = await asyncio.open_connection(sock=self.sock)
        try:
            bundle = await asyncio.to_thread(load_bundle, self.bundle_dir)
            engine = create_local_engine(self.config, bundle)
            await engine.start()
            engine.on_batch = lambda size, seconds: self.send(("batch", size, seconds))  # type: ignore[attr-defined]  # not warm-up's
        except Exception as exc:  # report why, then exit: the gateway decides what to do
            log.exception("engine process failed to start")
            self.send(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
            await self.writer.drain()
            return
        from service.runtime import freeze_heap

        freeze_heap()
        self.engine = engine
        self.send(("ready", bundle.version))
        ticker = asyncio.create_task(self._push_stats())
        try:
            while (message := await _read_frame(reader)) is not None:
                kind, wid = message[0], message[1]
                if kind == "topk":
                    self._track(wid, self._topk(wid, message[2]))
                elif kind == "reason":
                    self._track(wid, self._reason(wid, message[2], message[3]))
                elif kind == "cancel" and (task := self.tasks.get(wid)) is not None:
                    task.cancel()
        finally:
            ticker.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            await engine.close()

    def _track(self, wid: int, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks[wid] = task
        task.add_done_callback(lambda _t: self.tasks.pop(wid, None))

    async def _topk(self, wid: int, request: EngineRequest) -> None:
        assert self.engine is not None
        try:
            self.send(("items", wid, _pairs(await self.engine.recommend(request))))
        except EngineOverloaded as exc:
            self.send(("error", wid, "overloaded", str(exc), exc.retry_after))
        except Exception as exc:  # noqa: BLE001 (any failure of one call goes back to its caller)
            self.send(("error", wid, "unavailable", f"{type(exc).__name__}: {exc}", 0.0))

    async def _reason(self, wid: int, request: EngineRequest, max_tokens: int) -> None:
        assert self.engine is not None and self.writer is not None
        events = self.engine.reason(request, max_tokens)
        try:
            async for event in events:
                if isinstance(event, ReasoningDelta):
                    self.send(("delta", wid, event.text))
                    await self.writer.drain()  # a slow gateway slows the generation, not our memory
                else:
                    self.send(("done", wid, _pairs(event.items), event.reasoning_tokens, event.finish_reason))
        except EngineOverloaded as exc:
            self.send(("error", wid, "overloaded", str(exc), exc.retry_after))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("engine process: reasoning failed")
            self.send(("error", wid, "unavailable", f"{type(exc).__name__}: {exc}", 0.0))
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # aborts the generation if cut short

    async def _push_stats(self) -> None:
        assert self.engine is not None
        last: tuple[Any, ...] | None = None
        while True:
            s = self.engine.stats()
            current = ("stats", s.queue_depth, s.running, dict(s.extra))
            if current != last:
                self.send(current)
                last = current
            await asyncio.sleep(STATS_INTERVAL_S)
