"""The in-process engine on its own: micro-batching, batch-invariant answers, the documented scoring, and a
shutdown that never leaves a caller waiting."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from model_store.tokens import direct_prompt
from service.engine.base import EngineRequest, EngineUnavailable

pytestmark = pytest.mark.asyncio(loop_scope="session")


def request(bundle: Any, items: tuple[int, ...], rid: str, k: int = 5, **kw: Any) -> EngineRequest:
    return EngineRequest(rid, direct_prompt([bundle.spelled_id(i) for i in items]), k=k, **kw)


async def test_concurrent_requests_are_batched_with_identical_answers(gw_engine: Any, gw_bundle: Any) -> None:
    histories = [(i, i + 1, i + 2) for i in range(0, 48, 3)]
    alone = [await gw_engine.recommend(request(gw_bundle, h, f"a{n}")) for n, h in enumerate(histories)]
    sizes: list[int] = []
    seconds: list[float] = []
    gw_engine.on_batch, previous = (lambda n, s: (sizes.append(n), seconds.append(s))), gw_engine.on_batch
    try:
        together = await asyncio.gather(*[gw_engine.recommend(request(gw_bundle, h, f"b{n}"))
                                          for n, h in enumerate(histories)])
    finally:
        gw_engine.on_batch = previous
    assert max(sizes) > 1 and sum(sizes) == len(histories)
    assert len(seconds) == len(sizes) and all(s > 0 for s in seconds)  # each batch's own time
    for one, batched in zip(alone, together):
        assert [i.index for i in one] == [i.index for i in batched]
        assert np.allclose([i.score for i in one], [i.score for i in batched], atol=1e-4)


async def test_scores_are_summed_raw_log_probabilities(gw_engine: Any, gw_bundle: Any) -> None:
    from service.engine.hf_decoder import exhaustive_scores

    req = request(gw_bundle, (7, 8, 9), "score-1", k=3)
    items = await gw_engine.recommend(req)
    # Teacher-forced scores of just the returned items (one forward each).
    exact = exhaustive_scores(gw_engine.model, gw_engine.tokenizer, req.prompt,
                              gw_bundle.codes[[i.index for i in items]], gw_engine.decoder.search.code_token,
                              gw_bundle.id_format)
    assert np.allclose([i.score for i in items], exact, atol=1e-3)


async def test_prior_fusion_in_batches_matches_the_decoder(gw_engine: Any, gw_bundle: Any) -> None:
    """Requests with and without a history for the prior, batched together, each get the decoder's answer."""
    from service.engine.beam import request_bias

    reqs = [request(gw_bundle, (i, i + 1), f"prior-{i}", k=10, history=(i, i + 1) if i % 2 else None)
            for i in range(0, 40, 5)]
    got = await asyncio.gather(*[gw_engine.recommend(r) for r in reqs])
    for req, items in zip(reqs, got, strict=True):
        want = gw_engine.decoder.topk([req.prompt], [10], [10],
                                      biases=[request_bias(gw_bundle.prior, gw_bundle.trie, req.history)])[0]
        assert [i.index for i in items] == [i.index for i in want]
        assert np.allclose([i.score for i in items], [i.score for i in want], atol=1e-4)
    fused = [items for req, items in zip(reqs, got) if req.history is not None]
    # The fixture's prior says i + 1 follows i: it is the top item of most fused answers.
    assert sum(items[0].index == req.history[-1] + 1 for req, items in zip(
        [r for r in reqs if r.history is not None], fused)) >= len(fused) - 1


async def test_close_fails_waiting_callers_instead_of_hanging(gw_bundle: Any) -> None:
    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(gw_bundle, TransformersEngineConfig(max_batch=2, batch_wait_ms=0, torch_threads=1))
    await engine.start()
    calls = [asyncio.create_task(engine.recommend(request(gw_bundle, (i,), f"c{i}"))) for i in range(20)]
    await asyncio.sleep(0)  # let them queue
    await engine.close()
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=10)
    assert all(isinstance(r, (list, EngineUnavailable)) for r in done), done
    assert any(isinstance(r, EngineUnavailable) for r in done)
    with pytest.raises(EngineUnavailable):
        await engine.recommend(request(gw_bundle, (1,), "after"))


async def test_batches_wait_for_callers_while_they_keep_arriving(gw_bundle: Any) -> None:
    """Callers of one round that trickle in (as a gateway's loop answers and reads them one by one) are
    batched together as long as each arrives within `batch_wait_ms` of the previous one, even when
    the round spreads beyond it; a caller after a longer gap does not hold the batch."""
    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(gw_bundle, TransformersEngineConfig(
        max_batch=8, batch_wait_ms=60, batch_wait_max_ms=2000, workers=1, torch_threads=1))
    await engine.start()
    sizes: list[int] = []
    engine.on_batch = lambda size, seconds: sizes.append(size)

    async def after(delay_s: float, n: int) -> Any:
        await asyncio.sleep(delay_s)
        return await engine.recommend(request(gw_bundle, (n, n + 1), f"w{n}"))

    try:
        await asyncio.gather(*(after(0, n) for n in range(6)))  # a round of 6: the size the batcher expects
        sizes.clear()
        # 6 arrivals 20 ms apart: 100 ms from first to last, more than the 60 ms allowed between two.
        await asyncio.gather(*(after(0.02 * n, n) for n in range(6)))
        assert sizes == [6]
        sizes.clear()
        await asyncio.gather(*(after(0.0 if n < 5 else 0.5, n) for n in range(6)))
        assert sizes == [5, 1]
    finally:
        await engine.close()


async def test_two_workers_split_a_round_and_decode_at_the_same_time(gw_bundle: Any) -> None:
    """With two workers, a closed loop's callers are shared between them: each batch waits for half of
    the callers that recent batches held, and the two batches run at once on two threads."""
    import threading
    import time

    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(gw_bundle, TransformersEngineConfig(
        max_batch=32, batch_wait_ms=200, batch_wait_max_ms=1000, workers=2, torch_threads=1))
    await engine.start()
    runs: list[tuple[float, float, str, int]] = []
    threads: list[int] = []
    run_batch = engine._run_batch

    def timed(batch: Any, torch_threads: int) -> Any:
        start = time.perf_counter()
        out = run_batch(batch, torch_threads)
        threads.append(torch.get_num_threads())
        runs.append((start, time.perf_counter(), threading.current_thread().name, len(batch)))
        return out

    engine._run_batch = timed  # type: ignore[method-assign]
    try:
        histories = [(n % 40, n % 40 + 1) for n in range(16)]
        for _ in range(3):  # rounds of 16 callers, all at once: the batcher learns the round's size
            await asyncio.gather(*(engine.recommend(request(gw_bundle, h, f"r{n}")) for n, h in enumerate(histories)))
        assert engine.batcher.expected_batch() == 8
        runs.clear()
        alone = [engine.decoder.topk([request(gw_bundle, h, "x").prompt], [5], [10])[0] for h in histories]
        together = await asyncio.gather(*(engine.recommend(request(gw_bundle, h, f"t{n}"))
                                          for n, h in enumerate(histories)))
        assert sorted(size for *_, size in runs) == [8, 8]
        assert threads[-2:] == [1, 1]  # side by side: each worker its own share of the cores
        (_, e1, t1, _), (s2, _, t2, _) = sorted(runs)
        assert t1 != t2 and s2 < e1  # two threads, the second batch started before the first ended
        for one, got in zip(alone, together):  # and neither disturbed the other's numbers
            assert [i.index for i in one] == [i.index for i in got]
            assert np.allclose([i.score for i in one], [i.score for i in got], atol=1e-4)
        runs.clear()
        for n in range(3):  # one caller at a time: always worker 0, with both workers' threads
            await engine.recommend(request(gw_bundle, (n, n + 1), f"lone{n}"))
        assert {name for *_, name, _ in runs} == {"gream-engine-0_0"} and threads[-3:] == [2, 2, 2]
    finally:
        await engine.close()


async def test_a_lone_request_after_idle_does_not_wait_for_a_past_burst(gw_bundle: Any) -> None:
    """Recent batch sizes say how many callers a round brings back; once the engine has sat idle
    longer than a batch may wait, a new request is no returning caller and goes at once."""
    import time

    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(gw_bundle, TransformersEngineConfig(
        max_batch=8, batch_wait_ms=400, batch_wait_max_ms=500, workers=1, torch_threads=1))
    await engine.start()
    try:
        await asyncio.gather(*(engine.recommend(request(gw_bundle, (n, n + 1), f"burst{n}")) for n in range(6)))
        await asyncio.sleep(0.6)  # idle for longer than batch_wait_max_ms
        t = time.perf_counter()
        await engine.recommend(request(gw_bundle, (1, 2), "lone"))
        assert time.perf_counter() - t < 0.3  # it did not wait 400 ms for five callers that never come
    finally:
        await engine.close()
