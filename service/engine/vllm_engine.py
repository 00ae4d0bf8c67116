"""vLLM engine: the bundle's model in vLLM's AsyncLLM, in-process, with trie-constrained beam search.

Top-k decoding is a beam search over the item trie on top of vLLM's scheduler and prefix cache
(``LLM.beam_search`` is not used: under the default ``raw_logprobs`` mode it takes candidates before
the mask and silently returns fewer beams, docs/experiments/2026-11-27-vllm-cpu.md). It lives in
service.engine.vllm_beam: one vLLM request per beam prefix whose next-token distribution is needed,
asking for the raw log-probabilities of exactly that beam's trie children
(``SamplingParams.logprob_token_ids``) and going on down the trie so that one request serves several
levels; the values feed ``TrieBeamSearch.advance``, the bookkeeping every engine shares,
so the ranking (summed raw log-probabilities, softmax over the whole vocabulary, ties by token id) is
the one of ``HFTrieDecoder`` and the transformers engine.

Reasoning streams text with ``AsyncLLM.generate`` (``RequestOutputKind.DELTA``) under the request's
chain automaton (model_store.chain_automaton), applied by vLLM's own logits-processor extension point
(service.engine.vllm_chain, the request's ``ChainSpec`` in ``SamplingParams.extra_args``), until
THINK_END or the budget; then the same constrained top-k runs on prompt + reasoning +
``reasoning_answer_suffix()``. Closing the iterator aborts the vLLM request.

vLLM starts its engine core with ``spawn`` on CPU: scripts that create this engine need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from model_store.bundle import Bundle, load_bundle
from model_store.chain_automaton import ChainGrounding
from model_store.grounding import GroundingIndex
from model_store.prior import NodeFusion
from model_store.tokens import (
    THINK_END,
    direct_prompt,
    id_token_ids,
    reasoning_answer_suffix,
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
from service.engine.beam import TrieBeamSearch, beam_widths, request_bias
from service.engine.config import VLLMEngineConfig

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# vLLM reads these lazily; set project defaults before it is imported (an explicit setting wins).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
os.environ.setdefault("VLLM_CACHE_ROOT", str(_PROJECT_ROOT / ".cache" / "vllm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import vllm
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import tokens_input
from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from service.engine.vllm_beam import TriePathLogitsProcessor, VLLMTrieBeamSearch
from service.engine.vllm_chain import CHAIN_ARG, CHAIN_VOCAB_FILE, ChainLogitsProcessor
from service.engine.vllm_prefix import finer_prefix_matching

log = logging.getLogger("gream.engine")

VLLM_VERSION = vllm.__version__


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, bundle: Bundle | str | Path, config: VLLMEngineConfig | None = None):
        config = config or VLLMEngineConfig()
        self.config = config
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.default_beams = config.default_beams
        self.queue_max = config.queue_max
        self.dtype = config.dtype
        self.max_concurrent_reasoning = config.max_concurrent_reasoning
        self.temperature = config.reasoning_temperature
        self.seed = config.seed
        self.on_batch = None  # the gateway's batch-size hook; vLLM batches internally, so never called
        self.counters = collections.Counter[str]()
        self.aborted: collections.deque[str] = collections.deque(maxlen=256)  # vLLM ids of aborted streams
        self._llm: AsyncLLM | None = None
        self._model_dir: Path | None = None
        self._ready = False
        self._inflight = 0
        self._reasoning_active = 0
        self._seq = itertools.count()
        self._step_seconds = 0.05  # running estimate of one request's latency, for Retry-After
        trie = self.bundle.trie
        self.tokenizer: Any = None
        self._code_token = np.zeros(0, dtype=np.int64)  # flat code -> vocabulary id
        self._search: TrieBeamSearch | None = None  # over compact token ranks (see _load_tokenizer)
        self._beam: VLLMTrieBeamSearch | None = None
        self._rank_token = np.zeros(0, dtype=np.int64)  # compact rank -> vocabulary id
        self._depth = trie.depth
        self._think_end = -1
        self._suffix_ids: list[int] = []
        self._grounding: ChainGrounding | None = None
        self._max_len = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self._ready

    def stats(self) -> EngineStats:
        extra = {k: float(v) for k, v in self.counters.items()}
        extra["reasoning_active"] = float(self._reasoning_active)
        if self._beam is not None:
            extra["beam_vllm_requests"] = float(self._beam.requests_sent)
        running = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        return EngineStats(queue_depth=self._inflight, running=running, extra=extra)

    async def start(self) -> None:
        if self._ready:
            return
        started = time.perf_counter()
        self._load_tokenizer()
        self._model_dir = self._merged_model_dir()
        assert self._grounding is not None
        self._grounding.vocab.save(self._model_dir / CHAIN_VOCAB_FILE)  # read by ChainLogitsProcessor
        c = self.config
        args = AsyncEngineArgs(
            model=str(self._model_dir), tokenizer=str(self._model_dir), dtype=self.dtype,
            enforce_eager=c.enforce_eager, enable_prefix_caching=c.enable_prefix_caching,
            block_size=c.block_size, max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens, max_model_len=c.max_model_len,
            max_logprobs=MAX_LOGPROB_TOKEN_IDS, seed=self.seed, disable_log_stats=True,
            distributed_executor_backend=c.executor, logits_processors=[ChainLogitsProcessor, TriePathLogitsProcessor],
            tensor_parallel_size=c.tensor_parallel_size, **finer_prefix_matching(c.prefix_match_unit),
            **({} if c.gpu_memory_utilization is None else {"gpu_memory_utilization": c.gpu_memory_utilization}),
        )  # KV cache size: VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here)
        if c.executor == "uni":
            # The model runs inside the engine-core process instead of a further worker process: loads
            # ~20 s faster, but vLLM then does no OpenMP core binding and, measured on 2 shared cores,
            # single requests were ~10x slower; "mp" (vLLM's CPU default) stays the default.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            # Building the engine spawns the engine-core process and loads the model (20-90 s on two
            # cores); run it off the event loop so health checks still answer meanwhile.
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception:
            self._cleanup_model_dir()
            raise
        self._max_len = int(self._llm.model_config.max_model_len)
        await self._warm_up()
        self._ready = True
        log.info("vllm engine ready", extra={"vllm": VLLM_VERSION, "dtype": self.dtype,
                                             "load_s": round(time.perf_counter() - started, 1)})

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks measure cold prompts with it)."""
        if self._llm is not None:
            await self._llm.reset_prefix_cache()

    async def close(self) -> None:
        self._ready = False
        llm, self._llm = self._llm, None
        if llm is not None:
            # Stop the output handler first, or it reports the engine core's exit as an error.
            handler = getattr(llm, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                llm.output_handler = None
            await asyncio.to_thread(llm.shutdown)
        self._cleanup_model_dir()

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.bundle.tokenizer_path), local_files_only=True)
        self._code_token = np.asarray(id_token_ids(self.tokenizer, self.bundle.id_format), dtype=np.int64)
        # The beam search runs over compact ranks of the ID tokens (rank order = token-id order, so ties
        # break exactly as with real token ids): log-prob rows are [beams, ID tokens], not [beams, vocab].
        order = np.argsort(self._code_token, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self._rank_token = self._code_token[order]
        self._search = TrieBeamSearch(self.bundle.trie, rank)
        self._beam = VLLMTrieBeamSearch(lambda: self._llm, self.bundle.trie, self._search, self._rank_token,
                                        self.config.beam_lookahead)
        self._think_end = int(self.tokenizer.convert_tokens_to_ids(THINK_END))
        self._suffix_ids = self._encode(reasoning_answer_suffix())
        # The chain's masks cover the model's whole output layer.
        config = json.loads((Path(self.bundle.model_path) / "config.json").read_text())
        vocab_size = max(int(config.get("vocab_size", 0)), len(self.tokenizer))
        self._grounding = ChainGrounding(GroundingIndex(self.bundle), self.tokenizer, vocab_size, self._encode)

    def _merged_model_dir(self) -> Path:
        """One folder with the bundle's model and tokenizer files (symlinks): vLLM looks for a model
        config next to the tokenizer and otherwise retries with sleeps in every process."""
        root = Path(os.environ["VLLM_CACHE_ROOT"]) / "gream-models"
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{self.bundle.version}-", dir=root))
        for src_dir in (self.bundle.model_path, self.bundle.tokenizer_path):
            for src in Path(src_dir).iterdir():
                dst = folder / src.name
                if not dst.exists():
                    dst.symlink_to(src.resolve())
        return folder

    def _cleanup_model_dir(self) -> None:
        if self._model_dir is not None:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            self._model_dir = None

    async def _warm_up(self) -> None:
        spelled = [self.bundle.spelled_id(i) for i in self.bundle.popular(5)]
        ids = self._encode(direct_prompt(spelled))
        await self._topk("warm-up", ids, 1, self.default_beams, None, None)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ admission
    def _retry_after(self) -> float:
        return float(min(30, max(1, round(self._step_seconds * (1 + self._inflight / 32)))))

    def _admit(self) -> None:
        if self._llm is None or not self._ready:
            raise EngineUnavailable("engine is not ready")
        if self._llm.errored:
            raise EngineUnavailable("vLLM engine core has died")
        if self._inflight >= self.queue_max:
            self.counters["rejected_queue_full"] += 1
            raise EngineOverloaded(f"engine is full ({self._inflight} requests in flight)",
                                   retry_after=self._retry_after())

    # ------------------------------------------------------------------ top-k
    async def recommend(self, request: EngineRequest) -> list[ScoredItem]:
        self._admit()
        self._inflight += 1
        started = time.perf_counter()
        try:
            ids = self._encode(request.prompt)
            width = beam_widths([request.k], [request.num_beams], self.default_beams)[0]
            filt = self.bundle.trie.make_filter(exclude=request.exclude, allow=request.allow)
            return await self._topk(request.request_id, ids, request.k, width, filt,
                                    request_bias(self.bundle.prior, self.bundle.trie, request.history,
                                                 request.exclude, request.allow))
        finally:
            self._inflight -= 1
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * (time.perf_counter() - started)

    async def _topk(self, request_id: str, prompt_ids: list[int], k: int, width: int,
                    filt: TrieFilter | None, bias: NodeFusion | None) -> list[ScoredItem]:
        """Trie-constrained beam search of `width` beams (fused with the prior's term `bias`, if any);
        the top-k items, best first."""
        assert self._beam is not None
        if len(prompt_ids) + self._depth > self._max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room for a {self._depth}-token "
                             f"ID in the model's {self._max_len} positions")
        return await self._beam.topk(f"{request_id}-{next(self._seq)}", prompt_ids, k, width, filt, bias)

    # ------------------------------------------------------------------ reasoning
    async def reason(self, request: EngineRequest, max_reasoning_tokens: int
                     ) -> AsyncIterator[ReasoningDelta | ReasoningDone]:
        self._admit()
        if self._reasoning_active >= self.max_concurrent_reasoning:
            self.counters["rejected_reasoning_full"] += 1
            raise EngineOverloaded(f"{self._reasoning_active} reasoning streams already running",
                                   retry_after=self._retry_after())
        assert self._llm is not None
        llm = self._llm
        self._inflight += 1
        self._reasoning_active += 1
        vllm_id = f"{request.request_id}-{next(self._seq)}-think"
        generated: list[int] = []
        stream = None
        finished = False
        finish_reason = "length"
        try:
            assert self._grounding is not None
            prompt_ids = self._encode(request.prompt)
            room = self._max_len - len(prompt_ids) - len(self._suffix_ids) - self._depth
            budget = max(0, min(max_reasoning_tokens, room))
            if budget > 0:
                spec = self._grounding.spec(self._grounding.history(request.prompt), budget)
                params = SamplingParams(
                    max_tokens=budget, temperature=self.temperature, seed=self.seed if self.temperature else None,
                    stop_token_ids=[self._think_end], extra_args={CHAIN_ARG: spec.to_dict()},
                    output_kind=RequestOutputKind.DELTA, skip_special_tokens=True)
                stream = llm.generate(tokens_input(prompt_ids), params, request_id=vllm_id)
                async for out in stream:
                    completion = out.outputs[0]
                    generated.extend(completion.token_ids)
                    if completion.text:
                        yield ReasoningDelta(completion.text)
            finished = True
            if generated and generated[-1] == self._think_end:
                generated.pop()
                finish_reason = "end_of_thinking"
            self.counters["reasoning_tokens"] += len(generated)
            filt = self.bundle.trie.make_filter(exclude=request.exclude, allow=request.allow)
            width = beam_widths([request.k], [request.num_beams], self.default_beams)[0]
            bias = request_bias(self.bundle.prior, self.bundle.trie, request.history, request.exclude,
                                request.allow)
            answer_ids = self._encode(request.answer_prompt) if request.answer_prompt is not None \
                else prompt_ids + generated + self._suffix_ids
            items = await self._topk(request.request_id, answer_ids, request.k, width, filt, bias)
            yield ReasoningDone(items=items, reasoning_tokens=len(generated), finish_reason=finish_reason)
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer went away (client disconnect): stop the generation in the engine now.
            self.counters["reasoning_cancelled"] += 1
            if not finished:
                self.aborted.append(vllm_id)
                if stream is not None:
                    await stream.aclose()  # generate() aborts its request when closed mid-stream
                await llm.abort(vllm_id)
            raise
        finally:
            self._inflight -= 1
            self._reasoning_active -= 1

