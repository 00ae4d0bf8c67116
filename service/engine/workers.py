"""Decode workers: each a single-thread executor with its own torch threads (one OpenMP team).

Why several workers, each with fewer torch threads, rather than one worker with all of them: the
gateway's HTTP work shares the cores with decoding. One OpenMP team spanning every core stalls
whenever any of its threads is descheduled, so each slice of HTTP work stalls the whole batch;
independent workers lose only the slice's own CPU time, and one worker's batch runs while the other's
callers are being answered and come back (docs/benchmarks.md has the measurements).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from service.engine.base import EngineUnavailable


def worker_layout(workers: int | None, torch_threads: int | None) -> tuple[int, int]:
    """(decode workers, torch threads per worker). By default two workers wherever there are two or
    more cores, splitting the cores torch would use (its default thread count, which honours
    OMP_NUM_THREADS) between them."""
    cores = max(1, torch.get_num_threads())
    workers = workers if workers is not None else min(2, cores)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return workers, torch_threads or max(1, cores // workers)


class WorkerPool:
    """`size` single-thread executors; work for worker w always runs on the same thread."""

    def __init__(self, size: int, torch_threads: int, name: str = "gream-engine"):
        self.size = size
        self.torch_threads = torch_threads
        self._name = name
        self._executors: list[ThreadPoolExecutor] = []

    def start(self) -> None:
        # torch's thread count is per calling thread: each worker sets its own once.
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self._name}-{w}",
                                              initializer=torch.set_num_threads, initargs=(self.torch_threads,))
                           for w in range(self.size)]

    async def run(self, fn: Callable[..., Any], *args: Any, worker: int = 0) -> Any:
        """`fn(*args)` on `worker`'s thread. Raises EngineUnavailable once the pool is shut down."""
        if not self._executors:
            raise EngineUnavailable("engine is not started or was shut down")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executors[worker], fn, *args)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # Not our caller being cancelled: shutdown dropped the queued work.
                raise EngineUnavailable("engine was shut down") from None
            raise

    async def shutdown(self) -> None:
        executors, self._executors = self._executors, []
        for executor in executors:
            # Off the event loop: the step that is running may take a moment to finish.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
