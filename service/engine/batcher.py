"""The transformers engine's micro-batcher: top-k requests wait in a bounded queue and are gathered
into batches, one per free decode worker.

A full queue raises EngineOverloaded (the gateway answers 429 + Retry-After). Each batch waits for the
share of recent callers that is due to come back (at most `batch_wait_s` between two arrivals,
`batch_wait_max_s` in all). A batch that runs alone goes to worker 0 with every worker's threads.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.engine.base import EngineOverloaded, EngineUnavailable, ScoredItem
from service.engine.workers import WorkerPool

log = logging.getLogger("gream.engine")


@dataclass
class TopkJob:
    prompt: str | None
    prompt_ids: list[int] | None
    k: int
    width: int
    exclude: frozenset[int]
    allow: frozenset[int] | None
    future: asyncio.Future[list[ScoredItem]]
    history: tuple[int, ...] | None = None  # for the collaborative prior (EngineRequest.history)


# Runs one batch on a worker thread with the given torch thread count.
RunBatch = Callable[[Sequence[TopkJob], int], list[list[ScoredItem]]]


class MicroBatcher:
    def __init__(self, pool: WorkerPool, run_batch: RunBatch, *, queue_max: int, max_batch: int,
                 batch_wait_ms: float, batch_wait_max_ms: float,
                 on_batch: Callable[[int, float], None] | None = None):
        self.pool = pool
        self.run_batch = run_batch
        self.on_batch = on_batch  # metrics hook: each batch's size and the seconds spent on it
        self.queue_max = queue_max
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.batch_wait_max_s = max(batch_wait_ms, batch_wait_max_ms) / 1000.0
        self.batch_seconds = 0.05  # running estimate, for Retry-After
        self.counters = collections.Counter[str]()
        self._recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=8)
        self._last_batch_end = 0.0  # perf_counter() when the last batch was answered
        self._queue: asyncio.Queue[TopkJob] | None = None
        self._idle_workers: asyncio.PriorityQueue[int] | None = None  # free workers, lowest first
        self._loop_task: asyncio.Task[None] | None = None
        self._gathering: list[TopkJob] = []  # the batch being gathered (off the queue, not yet running)
        self._inflight: dict[asyncio.Task[None], list[TopkJob]] = {}  # running batches
        self._arrivals = asyncio.Event()  # set on every arrival; the gathering loop clears it to wait

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_max)
        self._idle_workers = asyncio.PriorityQueue()
        for worker in range(self.pool.size):
            self._idle_workers.put_nowait(worker)
        self._loop_task = asyncio.create_task(self._batch_loop(), name="gream-engine-batcher")

    async def close(self) -> None:
        # Read before the tasks' cleanup clears them.
        pending = [*self._gathering, *(job for batch in self._inflight.values() for job in batch)]
        for task in [t for t in (self._loop_task, *self._inflight) if t is not None]:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._loop_task = None
        self._gathering, self._inflight = [], {}
        if self._queue is not None:
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
        for job in pending:  # nobody may wait forever on a batch that will never run
            if not job.future.done():
                job.future.set_exception(EngineUnavailable("engine was shut down"))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    @property
    def running(self) -> int:
        """Requests in the batches the workers are running."""
        return sum(map(len, self._inflight.values()))

    def retry_after(self) -> float:
        return float(min(30, max(1, math.ceil(self.batch_seconds * (1 + self.queue_depth / self.max_batch)))))

    # ------------------------------------------------------------------ submitting
    async def submit(self, job: TopkJob) -> list[ScoredItem]:
        assert self._queue is not None, "batcher not started"
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counters["rejected_queue_full"] += 1
            raise EngineOverloaded(f"engine queue is full ({self.queue_max} waiting)",
                                   retry_after=self.retry_after()) from None
        self._arrivals.set()
        # If our caller is cancelled, the future is cancelled too and the loop skips the job.
        return await job.future

    # ------------------------------------------------------------------ gathering
    async def _batch_loop(self) -> None:
        """Gather a batch whenever a worker is free, and hand it to that worker without waiting for it."""
        assert self._queue is not None and self._idle_workers is not None
        queue, idle = self._queue, self._idle_workers
        while True:
            batch = self._gathering = [await queue.get()]
            # The lowest worker free once there is work (not before), so a lone caller keeps to worker 0.
            worker = await idle.get()
            expected = self.expected_batch()
            # Jobs already waiting are shared among the free workers, so that none of them idles while
            # another decodes a backlog alone.
            share = math.ceil((1 + queue.qsize()) / (1 + idle.qsize()))
            self._drain(batch, min(self.max_batch, max(expected, share)))
            if len(batch) < expected:
                await self._wait_for_jobs(batch, expected)
            self._gathering = []
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                idle.put_nowait(worker)
                continue
            # A batch that runs alone gets every worker's threads (a lone request decodes 15 % faster
            # on two threads than on one); batches side by side keep to their own share.
            alone = not self._inflight and queue.empty()
            threads = self.pool.torch_threads * self.pool.size if alone else self.pool.torch_threads
            task = asyncio.create_task(self._execute(batch, worker, threads), name="gream-engine-batch")
            self._inflight[task] = batch

    def expected_batch(self) -> int:
        """How many requests the batch being gathered should wait for.

        Under load the callers answered by the last batches come back one after another as the
        gateway's loop answers them and reads their next requests (about 0.7 ms each on 2 cores, so 32
        of them trickle in over 20+ ms): waiting for them keeps one forward pass per round and worker
        instead of splitting it. In a steady closed loop the last `workers` batches held every caller
        once, so a batch expects 1/workers of that: the largest such sum among recent batches, so that
        one split round does not teach the batcher to keep splitting."""
        if not self._inflight and time.perf_counter() - self._last_batch_end > self.batch_wait_max_s:
            # The engine sat idle: this is not a round's caller coming back, so nobody is expected
            # to follow (a lone request after a burst would otherwise wait for no one).
            return 1
        workers = self.pool.size
        sizes = list(self._recent_batch_sizes)
        span = min(workers, len(sizes))
        callers = max((sum(sizes[i:i + span]) for i in range(len(sizes) - span + 1)), default=1)
        return min(self.max_batch, max(1, math.ceil(callers / workers)))

    async def _execute(self, batch: list[TopkJob], worker: int, threads: int) -> None:
        """Run one batch on `worker` with `threads` torch threads and answer its callers; frees the
        worker afterwards."""
        assert self._idle_workers is not None
        started = time.perf_counter()
        try:
            results = await self.pool.run(self.run_batch, batch, threads, worker=worker)
        except Exception as exc:  # a failed batch fails its requests, never the engine
            log.exception("engine batch failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(EngineUnavailable(f"engine batch failed: {exc}"))
            return
        finally:
            self._inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._idle_workers.put_nowait(worker)
        elapsed = time.perf_counter() - started
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * elapsed
        self._recent_batch_sizes.append(len(batch))
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), elapsed)
        for job, items in zip(batch, results):
            if not job.future.done():
                job.future.set_result(items)
        self._last_batch_end = time.perf_counter()

    async def _wait_for_jobs(self, batch: list[TopkJob], expected: int) -> None:
        """Gather jobs until the batch holds `expected`, or none has arrived for `batch_wait_s`, or
        `batch_wait_max_s` has passed. The wait is counted from the last arrival, not from the first,
        so a round whose callers trickle in is not cut (those cut off would wait a whole forward pass
        for the next, small batch). `submit` wakes us on an arrival, instead of the loop polling the
        queue every few hundred us (each wake-up takes the GIL from the engine's threads)."""
        assert self._queue is not None
        self._drain(batch, expected)
        last_arrival = time.perf_counter()
        cap = last_arrival + self.batch_wait_max_s
        while len(batch) < expected:
            left = min(cap, last_arrival + self.batch_wait_s) - time.perf_counter()
            if left <= 0:
                break
            self._arrivals.clear()  # no await since the last drain: nothing can have arrived unseen
            try:
                await asyncio.wait_for(self._arrivals.wait(), left)
            except TimeoutError:
                pass
            before = len(batch)
            self._drain(batch, expected)
            if len(batch) > before:
                last_arrival = time.perf_counter()

    def _drain(self, batch: list[TopkJob], limit: int) -> None:
        """Move queued jobs into `batch` until it holds `limit`."""
        assert self._queue is not None
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return
