"""Trie-constrained beam search over vLLM's AsyncLLM: the vLLM engine's top-k decoding.

vLLM 0.32 has no extension point that forks a running sequence into beams sharing its KV blocks
(docs/experiments/2026-12-07-vllm-beam-search.md), so every beam prefix whose next-token distribution
the search needs is read by a vLLM request ``prompt + beam tokens``; vLLM's prefix cache serves the
prompt's full blocks and its scheduler batches the requests of all concurrent users. What this module
saves is requests:

- a request does not stop at its first position: it goes on down the trie (``lookahead``: through
  nodes with a single allowed child, or through every node along the most likely allowed child), kept
  on trie paths by ``TriePathLogitsProcessor``, and reads the next levels' log-probabilities too, so a
  beam at the next level often finds its distribution computed (or on its way) instead of sending a
  request of its own and recomputing the prompt's partial last block;
- positions are read as vLLM streams them (``RequestOutputKind.DELTA``) and keyed by beam prefix, so a
  level waits only for the positions it needs.

The numbers are vLLM's raw log-probabilities of exactly the candidate tokens
(``SamplingParams.logprob_token_ids``, computed before any logits processor,
``vllm/v1/sample/sampler.py``); ranking is ``TrieBeamSearch.advance``, shared by every engine: summed
raw log-probabilities (softmax over the whole vocabulary), the prior's term when fused, ties by token
id.

``TriePathLogitsProcessor`` runs in vLLM's engine core; the engine names the class in its engine
arguments and a request carries its paths in ``SamplingParams.extra_args[PATHS_ARG]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from vllm import SamplingParams
from vllm.inputs import tokens_input
from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, RequestOutputKind
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from model_store.prior import NodeFusion
from model_store.trie import ItemTrie, TrieFilter
from service.engine.base import EngineUnavailable, ScoredItem
from service.engine.beam import BeamState, TrieBeamSearch, stack_biases

PATHS_ARG = "gream_allowed_paths"

Positions = dict[int, float]  # vocabulary id -> raw log-probability at one position
FORK_LIMIT = 4  # at most this many children: each gets its own request in its parent's round
Lookahead = Literal["chain", "greedy"]


class TriePathLogitsProcessor(LogitsProcessor):
    """Keeps a request on trie paths: ``extra_args[PATHS_ARG]`` is a list of ``[path, allowed]`` pairs,
    and when the tokens the request has generated so far equal a `path`, its next token is the most
    likely of `allowed` (greedy sampling of the masked row). Rows without the argument are untouched.

    Masking changes the argmax, so the processor is not argmax-invariant (vLLM skips those for greedy
    batches). Raw log-probabilities are taken before logits processors run, so the numbers a request
    reads are untouched.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = device
        # batch row -> (path -> allowed token ids, the row's output ids so far)
        self.rows: dict[int, tuple[dict[tuple[int, ...], list[int]], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _new_row(params: SamplingParams, _prompt: list[int] | None, output_ids: list[int]
                 ) -> tuple[dict[tuple[int, ...], list[int]], list[int]] | None:
        pairs = (params.extra_args or {}).get(PATHS_ARG)
        if not pairs:
            return None
        return {tuple(int(t) for t in path): [int(t) for t in allowed] for path, allowed in pairs}, output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows: list[int] = []
        tokens: list[int] = []
        for row, (paths, output_ids) in self.rows.items():
            allowed = paths.get(tuple(output_ids))
            if allowed:
                rows += [row] * len(allowed)
                tokens += allowed
        if not rows:
            return logits
        row_index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        token_index = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        kept = logits[row_index, token_index]
        logits[row_index] = float("-inf")
        logits[row_index, token_index] = kept
        return logits


@dataclass(frozen=True)
class _Probe:
    """One vLLM request: the prompt and `prefix` (beam tokens), then up to `steps - 1` more tokens
    along `paths` (tokens after the prefix -> the children it may take next); at each position it reads
    the raw log-probabilities of `wanted`."""

    prefix: tuple[int, ...]
    paths: dict[tuple[int, ...], tuple[int, ...]]
    steps: int
    wanted: tuple[int, ...]


class VLLMTrieBeamSearch:
    """Top-k items of one prompt by trie-constrained beam search, scored through vLLM requests.

    `lookahead`: after its first position a request goes on through trie nodes with a single allowed
    child ("chain"), or through every node, taking the most likely allowed child ("greedy"); either way
    it stops when its candidates would exceed vLLM's limit on `logprob_token_ids`.
    """

    def __init__(self, llm: Callable[[], Any], trie: ItemTrie, search: TrieBeamSearch,
                 rank_token: np.ndarray, lookahead: Lookahead = "chain"):
        self._llm = llm  # returns the engine's AsyncLLM (None once closed)
        self.trie = trie
        self.search = search  # over compact token ranks (rank order = token-id order)
        self.rank_token = rank_token  # compact rank -> vocabulary id
        self.lookahead = lookahead
        self.requests_sent = 0  # vLLM requests, for the engine's metrics

    async def topk(self, tag: str, prompt_ids: list[int], k: int, width: int, filt: TrieFilter | None,
                   bias: NodeFusion | None) -> list[ScoredItem]:
        """The best k items after `width`-beam search (fused with the prior's term `bias`, if any)."""
        search, trie = self.search, self.trie
        biases = stack_biases([bias], trie.num_nodes)
        # beam prefix -> the future(s) of its next-token log-probabilities (several when split)
        known: dict[tuple[int, ...], list[asyncio.Future[Positions]]] = {}
        tasks: list[asyncio.Task[None]] = []
        state: BeamState = search.start(1)
        beams: list[tuple[int, ...]] = [()]  # vocabulary ids appended by each live beam
        try:
            for level in range(search.depth):
                kids = trie.children(state.node, filt)
                if len(kids.row) == 0:
                    return []
                kid_ranks = search.code_token[kids.code]
                bounds = np.searchsorted(kids.row, np.arange(state.size + 1))  # rows are grouped by beam
                for b in range(state.size):
                    if beams[b] not in known:
                        ranks = kid_ranks[bounds[b]:bounds[b + 1]]
                        for probe in self._plan(beams[b], int(state.node[b]), ranks, level, filt):
                            tasks.append(self._submit(f"{tag}-L{level}-{len(tasks)}", prompt_ids, probe, known))
                positions = await asyncio.gather(*(_merged(known[beam]) for beam in beams))
                logprobs = torch.full((state.size, len(self.rank_token)), float("-inf"), dtype=torch.float64)
                for b, values in enumerate(positions):
                    ranks = kid_ranks[bounds[b]:bounds[b + 1]]
                    logprobs[b, torch.from_numpy(ranks)] = torch.tensor(
                        [values[int(t)] for t in self.rank_token[ranks]], dtype=torch.float64)
                step = search.advance(state, logprobs, [width], [filt], biases)
                beams = [beams[p] + (int(self.rank_token[r]),) for p, r in zip(step.parent, step.token)]
                state = step.state
            if state.size == 0:
                return []
            return search.finish(state, 1, [k])[0]
        finally:
            # Requests still running read positions of pruned beams: stop them (closing a vLLM stream
            # aborts its request).
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for futures in known.values():
                for f in futures:
                    if f.done() and not f.cancelled():
                        f.exception()  # retrieved: a failure already surfaced through the level's gather

    def _tokens(self, codes: np.ndarray) -> list[int]:
        return [int(t) for t in self.rank_token[self.search.code_token[codes]]]

    def _plan(self, prefix: tuple[int, ...], node: int, ranks: np.ndarray, level: int,
              filt: TrieFilter | None) -> list[_Probe]:
        """Requests that read the next-token log-probabilities of `prefix` (trie node `node`, allowed
        children `ranks`): one request that goes on below the node (`lookahead`) as far as its
        candidates fit vLLM's limit on `logprob_token_ids`, else one request per slice of children."""
        tokens = [int(t) for t in self.rank_token[ranks]]
        if len(tokens) > MAX_LOGPROB_TOKEN_IDS:
            return [_Probe(prefix, {}, 1, tuple(tokens[lo:lo + MAX_LOGPROB_TOKEN_IDS]))
                    for lo in range(0, len(tokens), MAX_LOGPROB_TOKEN_IDS)]
        paths: dict[tuple[int, ...], tuple[int, ...]] = {}
        wanted = set(tokens)
        frontier: list[tuple[tuple[int, ...], int]] = [((), node)]  # paths the request may reach
        steps = 1
        while level + steps < self.search.depth and frontier:
            kids = self.trie.children(np.array([n for _, n in frontier]), filt)
            counts = np.bincount(kids.row, minlength=len(frontier))
            go_on = counts > 0 if self.lookahead == "greedy" else counts == 1
            keep = go_on[kids.row]
            if not keep.any():
                break
            grand = self.trie.children(kids.node[keep], filt)
            more = set(self._tokens(grand.code))
            if not more or len(wanted | more) > MAX_LOGPROB_TOKEN_IDS:
                break
            kid_tokens = self._tokens(kids.code)
            new_paths: dict[tuple[int, ...], list[int]] = {}
            new_frontier = []
            for row, token, child, kept in zip(kids.row, kid_tokens, kids.node, keep):
                if kept:
                    path = frontier[row][0]
                    new_paths.setdefault(path, []).append(token)
                    new_frontier.append((path + (token,), int(child)))
            paths.update({p: tuple(v) for p, v in new_paths.items()})
            wanted |= more
            frontier = new_frontier
            steps += 1
        probes = [_Probe(prefix, paths, steps, tuple(sorted(wanted)))]
        if 1 < len(tokens) <= FORK_LIMIT and level + 1 < self.search.depth:
            # A node with a few children: read each child's distribution in the same round instead of
            # waiting for this level's ranking (one round less; a pruned child costs one request).
            kids = self.trie.children(np.array([node]), filt)
            for token, child in zip(self._tokens(kids.code), kids.node):
                below = self.trie.children(np.array([child]), filt)
                if len(below.row):
                    probes += self._plan(prefix + (token,), int(child), self.search.code_token[below.code],
                                         level + 1, filt)
        return probes

    def _submit(self, vllm_id: str, prompt_ids: list[int], probe: _Probe,
                known: dict[tuple[int, ...], list[asyncio.Future[Positions]]]) -> asyncio.Task[None]:
        """Start `probe`. The future of its first position is registered in `known` now; each later
        position's, as soon as the token that leads to it is generated."""
        first: asyncio.Future[Positions] = asyncio.get_running_loop().create_future()
        known.setdefault(probe.prefix, []).append(first)
        self.requests_sent += 1
        return asyncio.create_task(self._run(vllm_id, prompt_ids, probe, first, known))

    async def _run(self, vllm_id: str, prompt_ids: list[int], probe: _Probe, first: asyncio.Future[Positions],
                   known: dict[tuple[int, ...], list[asyncio.Future[Positions]]]) -> None:
        llm = self._llm()
        pending: asyncio.Future[Positions] | None = first  # the next position's future, if wanted
        path: tuple[int, ...] = ()
        try:
            if llm is None:
                raise EngineUnavailable("engine is not ready")
            params = SamplingParams(
                max_tokens=probe.steps, temperature=0.0, logprob_token_ids=list(probe.wanted),
                detokenize=False, ignore_eos=True, output_kind=RequestOutputKind.DELTA, skip_clone=True,
                extra_args={PATHS_ARG: [[list(p), list(a)] for p, a in probe.paths.items()]}
                if probe.paths else None)
            stream = llm.generate(tokens_input(prompt_ids + list(probe.prefix)), params, request_id=vllm_id)
            async for out in stream:
                completion = out.outputs[0] if out.outputs else None
                if completion is None:
                    continue
                for token, position in zip(completion.token_ids, completion.logprobs or []):
                    current, pending = pending, None
                    if path in probe.paths and int(token) in probe.paths[path]:
                        key = probe.prefix + path + (int(token),)
                        if key not in known:  # else another request reads it already
                            pending = asyncio.get_running_loop().create_future()
                            known[key] = [pending]
                    if current is not None:
                        current.set_result({t: position[t].logprob for t in probe.wanted})
                    path += (int(token),)
            if pending is not None:
                raise EngineUnavailable(f"vLLM returned {len(path)} of {probe.steps} positions for {vllm_id}")
        except BaseException as exc:
            if pending is not None and not pending.done():
                if isinstance(exc, asyncio.CancelledError):
                    pending.cancel()
                else:
                    pending.set_exception(exc)
            raise


async def _merged(futures: Sequence[asyncio.Future[Positions]]) -> Positions:
    """One position's log-probabilities, read by one request or split over several."""
    parts = await asyncio.gather(*futures)
    if len(parts) == 1:
        return parts[0]
    merged: Positions = {}
    for part in parts:
        merged.update(part)
    return merged
