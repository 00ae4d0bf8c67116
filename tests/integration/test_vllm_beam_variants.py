"""The vLLM engine's other beam-search settings on the tiny bundle: greedy lookahead and prefix hits
inside a block (service.engine.vllm_prefix) give the same items and scores as HFTrieDecoder, under
exclusions and allow-lists too, and cancelling a request mid-search leaves the engine serving.

One engine for the module (loading takes 20-90 s on two cores), on the module's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from tests.support.vllm_checks import require_vllm

require_vllm()

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

K = 10


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(bundle: Any) -> AsyncIterator[Any]:
    from service.engine.config import VLLMEngineConfig
    from service.engine.vllm_engine import VLLMEngine

    eng = VLLMEngine(bundle, VLLMEngineConfig(default_beams=K, beam_lookahead="greedy", prefix_match_unit=4))
    await eng.start()
    yield eng
    await eng.close()


def prompts(bundle: Any, n: int, seed: int) -> list[str]:
    from model_store.tokens import direct_prompt

    rng = np.random.default_rng(seed)
    return [direct_prompt([bundle.spelled_id(int(i)) for i in
                           rng.choice(len(bundle.items), size=int(rng.integers(1, 11)), replace=False)])
            for _ in range(n)]


async def test_same_items_and_scores_as_hf(engine: Any, hf: Any, bundle: Any) -> None:
    from service.engine.base import EngineRequest

    rng = np.random.default_rng(3)
    ps = prompts(bundle, 6, seed=5)
    excludes = [frozenset(), frozenset(rng.choice(len(bundle.items), 40).tolist())] * 3
    # The same prompts twice: the second time they meet their own cached partial blocks.
    for _ in range(2):
        got = await asyncio.gather(*(engine.recommend(EngineRequest(f"v-{n}", p, K, exclude=ex))
                                     for n, (p, ex) in enumerate(zip(ps, excludes))))
        for prompt, exclude, items in zip(ps, excludes, got):
            want = hf.topk([prompt], [K], [K], [bundle.trie.make_filter(exclude=exclude)])[0]
            assert [i.index for i in items] == [i.index for i in want]
            np.testing.assert_allclose([i.score for i in items], [i.score for i in want], atol=1e-3)
    allow = frozenset(rng.choice(len(bundle.items), 30, replace=False).tolist())
    got = await engine.recommend(EngineRequest("v-allow", ps[0], K, allow=allow))
    want = hf.topk([ps[0]], [K], [K], [bundle.trie.make_filter(allow=allow)])[0]
    assert [i.index for i in got] == [i.index for i in want]


async def test_cancelled_search_stops_its_requests(engine: Any, bundle: Any) -> None:
    from service.engine.base import EngineRequest

    task = asyncio.create_task(engine.recommend(EngineRequest("v-cancel", prompts(bundle, 1, seed=9)[0], K)))
    while engine.stats().running == 0 and not task.done():  # wait until vLLM runs its requests
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0
    items = await engine.recommend(EngineRequest("v-after", prompts(bundle, 1, seed=10)[0], K))
    assert len(items) == K
