"""The vLLM CPU engine on the tiny bundle: same items and scores as HFTrieDecoder, valid and distinct
items under exclusions and allow-lists, streaming reasoning, and abort on disconnect.

One engine for the whole module (loading takes 20-90 s on two cores); every test runs on the module's
event loop, where AsyncLLM's output handler lives. vLLM forces `spawn` for its engine-core process on
CPU; under pytest the main module is pytest's own, so nothing needs setting for that.
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

    eng = VLLMEngine(bundle, VLLMEngineConfig(default_beams=K, dtype="float32", enforce_eager=True))
    await eng.start()
    yield eng
    await eng.close()


def prompts(bundle: Any, n: int, seed: int = 0, reasoning: bool = False) -> list[str]:
    from model_store.tokens import direct_prompt, reasoning_prompt

    rng = np.random.default_rng(seed)
    make = reasoning_prompt if reasoning else direct_prompt
    out = []
    for _ in range(n):
        hist = rng.choice(len(bundle.items), size=int(rng.integers(1, 11)), replace=False)
        out.append(make([bundle.spelled_id(int(i)) for i in hist]))
    return out


def request(rid: str, prompt: str, k: int = K, exclude: Any = (), allow: Any = None) -> Any:
    from service.engine.base import EngineRequest

    return EngineRequest(request_id=rid, prompt=prompt, k=k, exclude=frozenset(exclude),
                         allow=None if allow is None else frozenset(allow))


def hf_topk(hf: Any, bundle: Any, prompt: str, k: int = K, exclude: Any = (), allow: Any = None) -> Any:
    filt = bundle.trie.make_filter(exclude=exclude, allow=allow)
    return hf.topk([prompt], [k], [max(k, K)], [filt])[0]


def assert_same(got: Any, want: Any) -> None:
    assert [i.index for i in got] == [i.index for i in want]
    np.testing.assert_allclose([i.score for i in got], [i.score for i in want], atol=1e-3)


def assert_valid(items: Any, bundle: Any, k: int, exclude: Any = (), allow: Any = None) -> None:
    idx = [i.index for i in items]
    assert len(idx) == len(set(idx)), "items repeat"
    assert len(idx) <= k
    assert all(0 <= i < len(bundle.items) for i in idx)
    assert not set(idx) & set(exclude)
    if allow is not None:
        assert set(idx) <= set(allow)
    scores = [i.score for i in items]
    assert scores == sorted(scores, reverse=True)
    assert all(s <= 0 for s in scores)


async def test_agrees_with_hf_decoder(engine: Any, hf: Any, bundle: Any) -> None:
    ps = prompts(bundle, 4, seed=1)
    got = await asyncio.gather(*(engine.recommend(request(f"agree-{n}", p)) for n, p in enumerate(ps)))
    for prompt, items in zip(ps, got):
        assert len(items) == K
        assert_valid(items, bundle, K)
        assert_same(items, hf_topk(hf, bundle, prompt))


async def test_agrees_with_hf_decoder_when_fusing_the_prior(engine: Any, hf: Any, bundle: Any) -> None:
    from service.engine.base import EngineRequest
    from service.engine.beam import request_bias

    assert bundle.prior is not None
    for n, prompt in enumerate(prompts(bundle, 3, seed=4)):
        history = (7 * n, 7 * n + 1)
        got = await engine.recommend(EngineRequest(request_id=f"prior-{n}", prompt=prompt, k=K, history=history))
        want = hf.topk([prompt], [K], [K], [None], biases=[request_bias(bundle.prior, bundle.trie, history)])[0]
        assert_same(got, want)
        assert [i.index for i in got] != [i.index for i in hf_topk(hf, bundle, prompt)]


async def test_agrees_with_exclusions_and_allow_lists(engine: Any, hf: Any, bundle: Any) -> None:
    rng = np.random.default_rng(7)
    for n, prompt in enumerate(prompts(bundle, 3, seed=2)):
        plain = hf_topk(hf, bundle, prompt)
        exclude = {it.index for it in plain[:4]} | set(rng.choice(len(bundle.items), 30).tolist())
        got = await engine.recommend(request(f"excl-{n}", prompt, exclude=exclude))
        assert len(got) == K, "exclusions happen inside the decoding: k items still come back"
        assert_valid(got, bundle, K, exclude=exclude)
        assert_same(got, hf_topk(hf, bundle, prompt, exclude=exclude))

        allow = set(rng.choice(len(bundle.items), 40, replace=False).tolist())
        got = await engine.recommend(request(f"allow-{n}", prompt, allow=allow))
        assert_valid(got, bundle, K, allow=allow)
        assert_same(got, hf_topk(hf, bundle, prompt, allow=allow))


async def test_small_allow_list_and_large_k(engine: Any, bundle: Any) -> None:
    prompt = prompts(bundle, 1, seed=3)[0]
    allow = {3, 50, 120}
    got = await engine.recommend(request("tiny-allow", prompt, allow=allow | {7}, exclude={7}))
    assert sorted(i.index for i in got) == sorted(allow)
    got = await engine.recommend(request("big-k", prompt, k=40))
    assert len(got) == 40
    assert_valid(got, bundle, 40)
    assert await engine.recommend(request("nothing", prompt, allow=set())) == []


async def test_concurrent_requests_valid_and_distinct(engine: Any, bundle: Any) -> None:
    rng = np.random.default_rng(11)
    ps = prompts(bundle, 12, seed=4)
    excludes = [set(rng.choice(len(bundle.items), 20).tolist()) for _ in ps]
    got = await asyncio.gather(*(engine.recommend(request(f"conc-{n}", p, exclude=e))
                                 for n, (p, e) in enumerate(zip(ps, excludes))))
    for items, exclude in zip(got, excludes):
        assert len(items) == K
        assert_valid(items, bundle, K, exclude=exclude)
    assert engine.stats().queue_depth == 0


async def test_overload_is_rejected(engine: Any, bundle: Any) -> None:
    from service.engine.base import EngineOverloaded

    prompt = prompts(bundle, 1, seed=5)[0]
    saved, engine.queue_max = engine.queue_max, 1
    try:
        results = await asyncio.gather(engine.recommend(request("ov-1", prompt)),
                                       engine.recommend(request("ov-2", prompt)), return_exceptions=True)
    finally:
        engine.queue_max = saved
    assert isinstance(results[1], EngineOverloaded) and results[1].retry_after >= 1
    assert not isinstance(results[0], BaseException) and len(results[0]) == K


async def test_reasoning_streams_deltas_then_items(engine: Any, bundle: Any) -> None:
    from service.engine.base import ReasoningDelta, ReasoningDone

    budget = 24
    saw_text = False
    for n, prompt in enumerate(prompts(bundle, 4, seed=6, reasoning=True)):
        events = [ev async for ev in engine.reason(request(f"think-{n}", prompt), budget)]
        assert isinstance(events[-1], ReasoningDone)
        assert all(isinstance(ev, ReasoningDelta) for ev in events[:-1])
        done = events[-1]
        assert 0 <= done.reasoning_tokens <= budget
        assert len(done.items) == K
        assert_valid(done.items, bundle, K)
        text = "".join(ev.text for ev in events[:-1])
        assert "<a_" not in text.split("Denoised history:")[0], "ID tokens only in the rewrite section"
        assert done.finish_reason in ("end_of_thinking", "length")
        saw_text = saw_text or bool(text)
    assert saw_text, "no prompt produced any reasoning text"
    assert engine.stats().extra.get("reasoning_active", 0) == 0


async def test_reasoning_answer_from_the_direct_prompt(engine: Any, bundle: Any) -> None:
    """With `answer_prompt` the items after the chain are the direct prompt's top-k."""
    import dataclasses

    from model_store.tokens import direct_prompt, reasoning_prompt
    from service.engine.base import ReasoningDone

    spelled = [bundle.spelled_id(i) for i in (4, 9, 17)]
    direct = await engine.recommend(request("answer-direct", direct_prompt(spelled)))
    req = dataclasses.replace(request("answer-think", reasoning_prompt(spelled)), answer_prompt=direct_prompt(spelled))
    events = [ev async for ev in engine.reason(req, 24)]
    assert isinstance(events[-1], ReasoningDone)
    assert [s.index for s in events[-1].items] == [s.index for s in direct]


async def test_chains_are_grounded_and_closed(engine: Any, bundle: Any) -> None:
    """The chain automaton through vLLM's logits processor: the tiny bundle's random-weight model
    still writes only faithful chains, closed within the budget."""
    from loadtests.chain_quality import sample_chains

    report = await sample_chains(engine, bundle, n=40, budget=200, concurrency=8)
    assert report.valid_share >= 0.95, report.failures[:3]
    assert report.closed_share >= 0.90


async def test_chains_match_the_transformers_engine(engine: Any, bundle: Any) -> None:
    """One constraint, two engines: greedy chains agree token for token with the in-process decoder."""
    import threading

    import torch

    from model_store.model import load_bundle_model
    from model_store.tokens import reasoning_prompt
    from service.engine.base import ReasoningDelta
    from service.engine.reasoning_session import ReasoningDecoder

    decoder = ReasoningDecoder(load_bundle_model(bundle.model_path, dtype=torch.float32), engine.tokenizer, bundle,
                               threading.Lock())
    same = 0
    for n in range(4):
        history = [3 * n + 1, 7 * n + 2, 11 * n + 5, 13 * n + 8]
        prompt = reasoning_prompt([bundle.spelled_id(i) for i in history])
        session = decoder.prefill(f"hf-{n}", decoder.encode(prompt), 120, decoder.history(prompt))
        while not session.finished:
            decoder.step(session)
        want = engine.tokenizer.decode(session.generated)
        got = "".join([ev.text async for ev in engine.reason(request(f"same-{n}", prompt), 120)
                       if isinstance(ev, ReasoningDelta)])
        same += got == want
    assert same >= 3  # float32 on both sides; a near-tie may still flip one token


async def test_closing_the_stream_aborts_the_request(engine: Any, bundle: Any) -> None:
    from service.engine.base import ReasoningDelta

    assert engine._llm is not None
    calls: list[str] = []
    real_abort = engine._llm.abort

    async def spy(request_id: Any, internal: bool = False) -> None:
        calls.append(request_id if isinstance(request_id, str) else ",".join(request_id))
        await real_abort(request_id, internal=internal)

    engine._llm.abort = spy
    try:
        for n, prompt in enumerate(prompts(bundle, 6, seed=8, reasoning=True)):
            stream = engine.reason(request(f"cancel-{n}", prompt), 400)
            first = await stream.__anext__()
            if not isinstance(first, ReasoningDelta):
                await stream.aclose()
                continue  # this prompt ended its reasoning at once; try another
            await stream.aclose()  # what the gateway does when the client disconnects
            break
        else:
            pytest.fail("no prompt produced reasoning text to interrupt")
    finally:
        engine._llm.abort = real_abort
    think_id = engine.aborted[-1]
    assert think_id.startswith(f"cancel-{n}-") and think_id.endswith("-think")
    assert any(think_id in c for c in calls), "closing the stream must abort the vLLM request"
    for _ in range(50):
        if engine._llm.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert engine._llm.get_num_unfinished_requests() == 0
    assert engine.stats().queue_depth == 0
    # The engine still serves afterwards.
    assert len(await engine.recommend(request("after-cancel", prompts(bundle, 1, seed=9)[0]))) == K
