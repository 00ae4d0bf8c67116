"""In-process PyTorch engine: the fastest HF decoder for the model (shared_prefix.make_decoder) behind an asyncio micro-batcher.

Model and tokenizer work runs on a few workers (`workers`: each a single-thread executor with its own
torch threads), so the event loop never blocks. Top-k requests wait in a bounded queue (full ->
EngineOverloaded, which the gateway turns into 429 + Retry-After) and are gathered into batches of up
to `max_batch`, one batch per free worker, waiting for the share of recent callers that is due to
come back (at most `batch_wait_ms` between two arrivals, `batch_wait_max_ms` in all). Reasoning streams
submit one decoding step at a time to the same pool, so they interleave fairly with batches and stop as
soon as their consumer goes away (the next step is simply never submitted). A batch that runs alone
goes to worker 0 with every worker's threads.

Why several workers, each with fewer torch threads, rather than one worker with all of them: the
gateway's HTTP work shares the cores with decoding. One OpenMP team spanning every core stalls
whenever any of its threads is descheduled, so each slice of HTTP work stalls the whole batch;
independent workers lose only the slice's own CPU time, and one worker's batch runs while the other's
callers are being answered and come back (../shared/notes and the README's Benchmarks section have
the measurements).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from model_store.bundle import Bundle
from model_store.tokens import (
    THINK_END,
    direct_prompt,
    id_token_ids,
    reasoning_answer_suffix,
    reasoning_banned_token_ids,
    reasoning_prompt,
)
from model_store.trie import TrieFilter
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
from service.engine.beam import beam_widths, request_bias
from service.engine.hf_decoder import HFTrieDecoder
from service.engine.shared_prefix import make_decoder

log = logging.getLogger("gream.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _TopkJob:
    prompt: str | None
    prompt_ids: list[int] | None
    k: int
    width: int
    exclude: frozenset[int]
    allow: frozenset[int] | None
    future: asyncio.Future[list[ScoredItem]]
    history: tuple[int, ...] | None = None  # for the collaborative prior (EngineRequest.history)


@dataclass
class _Reasoning:
    """One reasoning generation; touched only by the worker thread, except `cancelled`."""

    request_id: str
    prompt_ids: list[int]
    budget: int
    cache: Any = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    finished: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class ReasoningRecord:
    """What became of a reasoning request (kept for stats and tests)."""

    request_id: str
    tokens: int
    budget: int
    outcome: str  # "done" | "cancelled" | "error"


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, bundle: Bundle, *, default_beams: int = 10, queue_max: int = 256, max_batch: int = 32,
                 batch_wait_ms: float = 10.0, batch_wait_max_ms: float = 50.0, workers: int | None = None,
                 torch_threads: int | None = None, dtype: str = "float32",
                 max_concurrent_reasoning: int = 16, reasoning_temperature: float = 0.0, seed: int = 0,
                 **_ignored: Any):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.bundle = bundle
        self.default_beams = default_beams
        self.queue_max = queue_max
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.batch_wait_max_s = max(batch_wait_ms, batch_wait_max_ms) / 1000.0
        self._recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=8)
        self._last_batch_end = 0.0  # perf_counter() when the last batch was answered
        self.workers, self.torch_threads = worker_layout(workers, torch_threads)
        self.dtype = DTYPES[dtype]
        self.max_concurrent_reasoning = max_concurrent_reasoning
        self.temperature = reasoning_temperature
        # Metrics hook: called with each batch's size and the seconds the engine spent on it.
        self.on_batch: Callable[[int, float], None] | None = None
        self._seed = seed
        self._executors: list[ThreadPoolExecutor] = []  # one single-thread executor per worker
        self._queue: asyncio.Queue[_TopkJob] | None = None
        self._batcher: asyncio.Task[None] | None = None
        # Free workers' indices, lowest first (so a lone caller keeps to worker 0).
        self._idle_workers: asyncio.PriorityQueue[int] | None = None
        self._reasoning_turn = itertools.count()  # spreads reasoning sessions over the workers
        self._ready = False
        self._gathering: list[_TopkJob] = []  # the batch being gathered (taken off the queue, not yet running)
        self._inflight: dict[asyncio.Task[None], list[_TopkJob]] = {}  # running batches
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe to call from two threads at once
        self._reasoning_active = 0
        self._batch_seconds = 0.05  # running estimate, for Retry-After
        self._arrivals = asyncio.Event()  # set by _submit on every arrival; the batcher clears it to wait
        self.counters = collections.Counter[str]()
        self.recent_reasoning: collections.deque[ReasoningRecord] = collections.deque(maxlen=256)
        # Set in start(), on the worker thread.
        self.tokenizer: Any = None
        self.model: Any = None
        self.decoder: HFTrieDecoder | None = None
        self._banned: torch.Tensor | None = None
        self._think_end = -1
        self._suffix_ids: list[int] = []
        self._max_positions = 0
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._ready:
            return
        # torch's thread count is per calling thread: each worker sets its own. One executor per worker,
        # so that a worker is one thread with one OpenMP team, and a lone batch always lands on worker 0.
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gream-engine-{w}",
                                              initializer=torch.set_num_threads, initargs=(self.torch_threads,))
                           for w in range(self.workers)]
        await self._in_worker(self._load)
        self._queue = asyncio.Queue(maxsize=self.queue_max)
        self._idle_workers = asyncio.PriorityQueue()
        for worker in range(self.workers):
            self._idle_workers.put_nowait(worker)
        self._batcher = asyncio.create_task(self._batch_loop(), name="gream-engine-batcher")
        await self._warm_up()
        self._ready = True
        log.info("transformers engine ready", extra={"dtype": str(self.dtype), "items": len(self.bundle.items),
                                                     "workers": self.workers, "torch_threads": self.torch_threads})

    async def close(self) -> None:
        self._ready = False
        # Read before the tasks' cleanup clears them.
        pending = [*self._gathering, *(job for batch in self._inflight.values() for job in batch)]
        for task in [t for t in (self._batcher, *self._inflight) if t is not None]:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._batcher = None
        self._gathering, self._inflight = [], {}
        if self._queue is not None:
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
        for job in pending:  # nobody may wait forever on a batch that will never run
            if not job.future.done():
                job.future.set_exception(EngineUnavailable("engine was shut down"))
        executors, self._executors = self._executors, []
        for executor in executors:
            # Off the event loop: the step that is running may take a moment to finish.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._ready

    def stats(self) -> EngineStats:
        extra = {k: float(v) for k, v in self.counters.items()}
        extra["reasoning_active"] = float(self._reasoning_active)
        extra["workers"] = float(self.workers)
        return EngineStats(queue_depth=self._queue.qsize() if self._queue else 0,
                           running=self._running() + self._reasoning_active, extra=extra)

    def _running(self) -> int:
        """Requests in the batches the workers are running."""
        return sum(map(len, self._inflight.values()))

    def _load(self) -> None:
        from transformers import AutoTokenizer

        from model_store.model import load_bundle_model

        self._generator = torch.Generator().manual_seed(self._seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.bundle.tokenizer_path), local_files_only=True)
        self.model = load_bundle_model(self.bundle.model_path, dtype=self.dtype)
        code_ids = id_token_ids(self.tokenizer, self.bundle.id_format)
        self.decoder = make_decoder(self.model, self.tokenizer, self.bundle.trie, code_ids)
        self._think_end = int(self.tokenizer.convert_tokens_to_ids(THINK_END))
        self._suffix_ids = self._encode(reasoning_answer_suffix())
        self._max_positions = int(getattr(self.model.config, "max_position_embeddings", 4096))
        # Free reasoning text may not contain ID tokens or markers (only THINK_END may end it), nor
        # the padding rows of an embedding matrix larger than the tokenizer.
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        banned = torch.zeros(vocab, dtype=torch.bool)
        banned[len(self.tokenizer):] = True
        banned[[t for t in reasoning_banned_token_ids(self.tokenizer, self.bundle.id_format) if t < vocab]] = True
        self._banned = banned

    async def _warm_up(self) -> None:
        """One batch and a few reasoning steps, so the first real request pays no one-off costs."""
        spelled = [self.bundle.spelled_id(i) for i in self.bundle.popular(5)]
        await self._submit(_TopkJob(direct_prompt(spelled), None, 1, self.default_beams, frozenset(), None,
                                    asyncio.get_running_loop().create_future()))
        prompt_ids = await self._in_worker(self._reasoning_ids, spelled)
        session = await self._in_worker(self._prefill, "warm-up", prompt_ids, 2)
        while not session.finished:
            await self._in_worker(self._step, session)

    def _reasoning_ids(self, spelled: Sequence[str]) -> list[int]:
        return self._encode(reasoning_prompt(spelled))

    def _encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _in_worker(self, fn: Callable[..., Any], *args: Any, worker: int = 0) -> Any:
        if not self._executors:
            raise EngineUnavailable("engine is not started or was shut down")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executors[worker], fn, *args)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # Not our caller being cancelled: close() dropped the queued work.
                raise EngineUnavailable("engine was shut down") from None
            raise

    # ------------------------------------------------------------------ top-k
    async def recommend(self, request: EngineRequest) -> list[ScoredItem]:
        if not self._ready:
            raise EngineUnavailable("engine is not ready")
        return await self._submit(self._job(request, prompt=request.prompt, prompt_ids=None))

    def _job(self, request: EngineRequest, prompt: str | None, prompt_ids: list[int] | None) -> _TopkJob:
        width = beam_widths([request.k], [request.num_beams], self.default_beams)[0]
        return _TopkJob(prompt, prompt_ids, request.k, width, request.exclude, request.allow,
                        asyncio.get_running_loop().create_future(), request.history)

    def _retry_after(self) -> float:
        depth = self._queue.qsize() if self._queue else 0
        return float(min(30, max(1, math.ceil(self._batch_seconds * (1 + depth / self.max_batch)))))

    async def _submit(self, job: _TopkJob) -> list[ScoredItem]:
        assert self._queue is not None
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counters["rejected_queue_full"] += 1
            raise EngineOverloaded(f"engine queue is full ({self.queue_max} waiting)",
                                   retry_after=self._retry_after()) from None
        self._arrivals.set()
        # If our caller is cancelled, the future is cancelled too and the batcher skips the job.
        return await job.future

    async def _batch_loop(self) -> None:
        """Gather a batch whenever a worker is free, and hand it to that worker without waiting for it."""
        assert self._queue is not None and self._idle_workers is not None
        queue, idle = self._queue, self._idle_workers
        while True:
            batch = self._gathering = [await queue.get()]
            # The lowest worker free once there is work (not before), so a lone caller keeps to worker 0.
            worker = await idle.get()
            expected = self._expected_batch()
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
            threads = self.torch_threads * self.workers if alone else self.torch_threads
            task = asyncio.create_task(self._execute(batch, worker, threads), name="gream-engine-batch")
            self._inflight[task] = batch

    def _expected_batch(self) -> int:
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
        sizes = list(self._recent_batch_sizes)
        span = min(self.workers, len(sizes))
        callers = max((sum(sizes[i:i + span]) for i in range(len(sizes) - span + 1)), default=1)
        return min(self.max_batch, max(1, math.ceil(callers / self.workers)))

    async def _execute(self, batch: list[_TopkJob], worker: int, threads: int) -> None:
        """Run one batch on `worker` with `threads` torch threads and answer its callers; frees the
        worker afterwards."""
        assert self._idle_workers is not None
        started = time.perf_counter()
        try:
            results = await self._in_worker(self._run_batch, batch, threads, worker=worker)
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
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        self._recent_batch_sizes.append(len(batch))
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), elapsed)
        for job, items in zip(batch, results):
            if not job.future.done():
                job.future.set_result(items)
        self._last_batch_end = time.perf_counter()

    async def _wait_for_jobs(self, batch: list[_TopkJob], expected: int) -> None:
        """Gather jobs until the batch holds `expected`, or none has arrived for `batch_wait_s`, or
        `batch_wait_max_s` has passed. The wait is counted from the last arrival, not from the first,
        so a round whose callers trickle in is not cut (those cut off would wait a whole forward pass
        for the next, small batch). _submit wakes us on an arrival, instead of the loop polling the
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

    def _drain(self, batch: list[_TopkJob], limit: int) -> None:
        """Move queued jobs into `batch` until it holds `limit`."""
        assert self._queue is not None
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _run_batch(self, batch: Sequence[_TopkJob], threads: int) -> list[list[ScoredItem]]:
        assert self.decoder is not None
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # this worker thread's own OpenMP team
        # One tokenizer call for the batch's text prompts: per-prompt calls cost twice as much (4.1
        # against 2.2 ms for 32 amazon prompts), about 1 % of a batch.
        texts = [job.prompt or "" for job in batch if job.prompt_ids is None]
        with self._tokenizer_lock:
            encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        ids = [job.prompt_ids if job.prompt_ids is not None else list(next(encoded)) for job in batch]
        filters: list[TrieFilter | None] = [
            self.bundle.trie.make_filter(exclude=job.exclude, allow=job.allow) for job in batch]
        biases = [request_bias(self.bundle.prior, self.bundle.trie, job.history, job.exclude, job.allow)
                  for job in batch]
        return self.decoder.topk([], [j.k for j in batch], [j.width for j in batch], filters, prompt_ids=ids,
                                 biases=biases)

    # ------------------------------------------------------------------ reasoning
    async def reason(self, request: EngineRequest, max_reasoning_tokens: int
                     ) -> AsyncIterator[ReasoningDelta | ReasoningDone]:
        if not self._ready:
            raise EngineUnavailable("engine is not ready")
        if self._reasoning_active >= self.max_concurrent_reasoning:
            self.counters["rejected_reasoning_full"] += 1
            raise EngineOverloaded(f"{self._reasoning_active} reasoning streams already running",
                                   retry_after=self._retry_after())
        self._reasoning_active += 1
        session: _Reasoning | None = None
        outcome = "error"
        try:
            worker = next(self._reasoning_turn) % self.workers
            prompt_ids = await self._in_worker(self._encode, request.prompt, worker=worker)
            session = await self._in_worker(self._prefill, request.request_id, prompt_ids, max_reasoning_tokens,
                                            worker=worker)
            while not session.finished:
                delta = await self._in_worker(self._step, session, worker=worker)
                if delta:
                    yield ReasoningDelta(delta)
            tail = await self._in_worker(self._flush_text, session, worker=worker)
            if tail:
                yield ReasoningDelta(tail)
            answer_ids = session.prompt_ids + session.generated + self._suffix_ids
            session.cache = None  # free the reasoning KV cache before the top-k prefill
            items = await self._submit(self._job(request, prompt=None, prompt_ids=answer_ids))
            outcome = "done"
            yield ReasoningDone(items=items, reasoning_tokens=len(session.generated))
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer went away (client disconnect): make sure no further step runs.
            outcome = "cancelled"
            if session is not None:
                session.cancelled.set()
            self.counters["reasoning_cancelled"] += 1
            raise
        finally:
            self._reasoning_active -= 1
            if session is not None:
                session.cache = None
                self.counters["reasoning_tokens"] += len(session.generated)
                self.recent_reasoning.append(ReasoningRecord(session.request_id, len(session.generated),
                                                             session.budget, outcome))

    def _prefill(self, request_id: str, prompt_ids: list[int], max_tokens: int) -> _Reasoning:
        # Leave room in the position table for the answer suffix and the ID tokens.
        room = self._max_positions - len(prompt_ids) - len(self._suffix_ids) - self.bundle.trie.depth
        session = _Reasoning(request_id, prompt_ids, budget=max(0, min(max_tokens, room)))
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        session.cache, session.logits = out.past_key_values, out.logits[0, -1]
        session.finished = session.budget == 0
        return session

    def _step(self, session: _Reasoning) -> str:
        """Pick one token; run the model on it unless it ends the reasoning. Returns new text."""
        if session.cancelled.is_set() or session.finished:
            session.finished = True
            return ""
        assert session.logits is not None and self._banned is not None
        logits = session.logits.float().masked_fill(self._banned, float("-inf"))
        if self.temperature > 0:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self._generator))
        else:
            token = int(torch.argmax(logits))
        if token == self._think_end:
            session.finished = True
            return ""
        session.generated.append(token)
        if len(session.generated) >= session.budget:
            session.finished = True
        else:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=session.cache, use_cache=True)
            session.cache, session.logits = out.past_key_values, out.logits[0, -1]
        return self._new_text(session, final=False)

    def _flush_text(self, session: _Reasoning) -> str:
        return self._new_text(session, final=True)

    def _new_text(self, session: _Reasoning, final: bool) -> str:
        with self._tokenizer_lock:
            text = self.tokenizer.decode(session.generated, skip_special_tokens=False)
        # A byte-level token may end inside a UTF-8 character: hold it back until it completes.
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(session.emitted):
            return ""  # detokenisation re-segmented earlier text; never rewrite what was sent
        delta, session.emitted = text[len(session.emitted):], text
        return delta


def worker_layout(workers: int | None, torch_threads: int | None) -> tuple[int, int]:
    """(decode workers, torch threads per worker). By default two workers wherever there are two or
    more cores, splitting the cores torch would use (its default thread count, which honours
    OMP_NUM_THREADS) between them."""
    cores = max(1, torch.get_num_threads())
    workers = workers if workers is not None else min(2, cores)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return workers, torch_threads or max(1, cores // workers)
