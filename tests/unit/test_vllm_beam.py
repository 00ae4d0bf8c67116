"""The vLLM beam search's request planning against the shared beam search, on a stand-in for AsyncLLM.

The stand-in scores every sequence with deterministic pseudo-random log-probabilities and honours the
trie paths the way TriePathLogitsProcessor does, so the items and scores must equal those of
TrieBeamSearch fed with the same distributions level by level, with fewer requests than one per beam
per level.
"""

from __future__ import annotations

import asyncio
import importlib.util
import zlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

from model_store.tokens import IdFormat
from model_store.trie import ItemTrie
from service.engine.beam import TrieBeamSearch
from service.engine.vllm_beam import PATHS_ARG, TriePathLogitsProcessor, VLLMTrieBeamSearch

VOCAB_OFFSET = 10


def distribution(seq: tuple[int, ...], vocab: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(np.asarray(seq, dtype=np.int64).tobytes()))
    logits = torch.from_numpy(rng.normal(size=vocab) * 3)
    return torch.log_softmax(logits, dim=-1).numpy()


class FakeLLM:
    """AsyncLLM.generate for greedy requests with logprob_token_ids, DELTA outputs, and the paths
    TriePathLogitsProcessor keeps a request on."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.requests = 0
        self.positions = 0

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        self.requests += 1
        seq = list(prompt["prompt_token_ids"])
        paths = {tuple(p): a for p, a in (params.extra_args or {}).get(PATHS_ARG, [])}
        out: list[int] = []
        for _ in range(params.max_tokens):
            await asyncio.sleep(0)
            self.positions += 1
            lp = distribution(tuple(seq), self.vocab)
            allowed = paths.get(tuple(out))
            token = max(allowed, key=lambda t: (lp[t], -t)) if allowed else int(np.argmax(lp))
            position = {t: SimpleNamespace(logprob=float(lp[t])) for t in [*params.logprob_token_ids, token]}
            seq.append(token)
            out.append(token)
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[token], logprobs=[position])])


def make_search(seed: int) -> tuple[ItemTrie, TrieBeamSearch, np.ndarray, int]:
    fmt = IdFormat(levels=3, codebook_size=160, dedup_size=4)
    rng = np.random.default_rng(seed)
    # Few distinct second-level codes per first-level code, so that most deeper nodes have one child.
    first = rng.integers(0, 160, size=900)
    codes = np.stack([first, first % 7, rng.integers(0, 3, size=900), rng.integers(0, 2, size=900)], axis=1)
    codes = np.unique(codes, axis=0)
    trie = ItemTrie.build(codes, fmt)
    code_token = VOCAB_OFFSET + rng.permutation(fmt.vocab_size)
    order = np.argsort(code_token, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return trie, TrieBeamSearch(trie, rank), code_token[order], fmt.vocab_size + VOCAB_OFFSET


def reference(trie: ItemTrie, search: TrieBeamSearch, rank_token: np.ndarray, vocab: int, prompt: list[int],
              k: int, width: int, filt: Any) -> list[Any]:
    state = search.start(1)
    beams: list[list[int]] = [[]]
    for _ in range(search.depth):
        rows = np.stack([distribution(tuple(prompt + b), vocab)[rank_token] for b in beams])
        step = search.advance(state, torch.from_numpy(rows), [width], [filt])
        beams = [beams[p] + [int(rank_token[r])] for p, r in zip(step.parent, step.token)]
        state = step.state
    return search.finish(state, 1, [k])[0]


@pytest.mark.parametrize("lookahead", ["chain", "greedy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_items_and_scores_with_fewer_requests(seed: int, lookahead: Any) -> None:
    trie, search, rank_token, vocab = make_search(seed)
    llm = FakeLLM(vocab)
    beam = VLLMTrieBeamSearch(lambda: llm, trie, search, rank_token, lookahead)
    rng = np.random.default_rng(seed)
    for case in range(6):
        prompt = [int(t) for t in rng.integers(0, VOCAB_OFFSET, size=5 + case)]
        k, width = [(10, 10), (3, 5), (1, 1), (10, 20), (5, 10), (10, 10)][case]
        filt = trie.make_filter(exclude=rng.choice(len(trie.node_item[trie.node_item >= 0]), 50).tolist()) \
            if case % 2 else None
        before = llm.requests
        got = asyncio.run(beam.topk(f"t{case}", prompt, k, width, filt, None))
        want = reference(trie, search, rank_token, vocab, prompt, k, width, filt)
        assert [i.index for i in got] == [i.index for i in want]
        np.testing.assert_allclose([i.score for i in got], [i.score for i in want], rtol=0, atol=1e-9)
        one_per_beam = 2 + 3 * width  # the root's 160 children need two requests
        assert llm.requests - before < one_per_beam


def test_processor_keeps_only_its_rows_on_their_paths() -> None:
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    proc = TriePathLogitsProcessor(None, torch.device("cpu"), False)
    path_out: list[int] = []
    free_out: list[int] = []
    paths = [[[], [3, 6]], [[3], [5]], [[6], [1, 2]]]
    added = [(0, SamplingParams(extra_args={PATHS_ARG: paths}), None, path_out),
             (1, SamplingParams(), None, free_out)]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    logits = torch.randn(2, 8)
    out = proc.apply(logits.clone())
    assert torch.isinf(out[0]).sum() == 6 and out[0, 3] == logits[0, 3] and out[0, 6] == logits[0, 6]
    assert torch.equal(out[1], logits[1])
    path_out.append(3)
    assert int(proc.apply(logits.clone())[0].argmax()) == 5
    path_out.append(5)
    assert torch.equal(proc.apply(logits.clone()), logits)  # off its paths: untouched
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    assert not proc.rows and not proc.is_argmax_invariant()
