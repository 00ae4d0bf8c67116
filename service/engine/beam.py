"""Trie-constrained beam search bookkeeping, shared by every engine.

The engine supplies, per decoding step, the model's raw log-probabilities (log-softmax over the whole
vocabulary) for each live beam; this module expands each beam only to its trie children (minus the
request's exclusions), scores candidates by summed raw log-probabilities (docs/architecture.md, "Scoring") and
keeps the best `width` per prompt. Nothing here knows which runtime produced the numbers, so all
engines rank identically.

When the bundle has a collaborative prior (model_store.prior), each prompt may carry its
`NodeFusion`: beams then rank by the fused score of the node they reached, computed from the model's
summed log-probability so far and the prior's term for that node (a mixture of the two distributions,
or their product), and an item's score is the fused score of its leaf.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model_store.prior import NodeFusion, TransitionPrior
from model_store.trie import ROOT, ItemTrie, TrieFilter
from service.engine.base import ScoredItem


@dataclass
class BeamState:
    prompt: np.ndarray  # int64 [beams]: which prompt of the batch each live beam serves
    node: np.ndarray  # int64 [beams]: trie node the beam has reached
    score: np.ndarray  # float64 [beams]: what beams rank by: model_score, fused with the prior if any
    model_score: np.ndarray  # float64 [beams]: summed raw log-probabilities so far
    depth: int = 0

    @property
    def size(self) -> int:
        return len(self.node)


@dataclass(frozen=True)
class StackedFusion:
    """The NodeFusion of every prompt of a batch (prompts without a prior score by the model alone)."""

    term: np.ndarray  # float64 [prompts, trie nodes]
    model_log_weight: np.ndarray | None  # float64 [prompts] for mixtures; None for products

    def score(self, prompt: np.ndarray, node: np.ndarray, model_score: np.ndarray) -> np.ndarray:
        term = self.term[prompt, node]
        if self.model_log_weight is None:
            return model_score + term
        return np.logaddexp(term, self.model_log_weight[prompt] + model_score)


@dataclass(frozen=True)
class Step:
    state: BeamState
    parent: np.ndarray  # int64 [new beams]: index of each new beam's parent in the previous state
    token: np.ndarray  # int64 [new beams]: token id each new beam appended


class TrieBeamSearch:
    def __init__(self, trie: ItemTrie, code_token_ids: Sequence[int]):
        self.trie = trie
        self.code_token = np.asarray(code_token_ids, dtype=np.int64)  # flat code -> vocabulary id

    @property
    def depth(self) -> int:
        return self.trie.depth

    def start(self, batch_size: int) -> BeamState:
        return BeamState(prompt=np.arange(batch_size, dtype=np.int64),
                         node=np.full(batch_size, ROOT, dtype=np.int64), score=np.zeros(batch_size),
                         model_score=np.zeros(batch_size))

    def advance(self, state: BeamState, logprobs: torch.Tensor, widths: Sequence[int],
                filters: Sequence[TrieFilter | None], biases: StackedFusion | None = None) -> Step:
        """Expand every live beam by its allowed children and keep the top widths[p] per prompt p.

        `logprobs` is [state.size, vocab]: raw log-probabilities of the next token for each beam.
        `biases` is None or the batch's prior terms from `stack_biases`.
        """
        rows, codes, nodes = self._candidates(state, filters)
        tokens = self.code_token[codes]
        cand_prompt = state.prompt[rows]
        if len(rows):
            picked = logprobs[torch.from_numpy(rows), torch.from_numpy(tokens)]
            model_score = state.model_score[rows] + picked.double().cpu().numpy()
            cand_score = model_score if biases is None else biases.score(cand_prompt, nodes, model_score)
        else:
            model_score = cand_score = np.zeros(0)
        # Best first within each prompt; ties broken by token id so every engine agrees exactly.
        order = np.lexsort((tokens, -cand_score, cand_prompt))
        cand_prompt = cand_prompt[order]
        group_start = np.searchsorted(cand_prompt, cand_prompt, side="left")
        rank = np.arange(len(order)) - group_start
        keep = order[rank < np.asarray(widths, dtype=np.int64)[cand_prompt]]
        new_state = BeamState(prompt=state.prompt[rows[keep]], node=nodes[keep], score=cand_score[keep],
                              model_score=model_score[keep], depth=state.depth + 1)
        return Step(state=new_state, parent=rows[keep], token=tokens[keep])

    def _candidates(self, state: BeamState, filters: Sequence[TrieFilter | None]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if all(f is None for f in filters):
            kids = self.trie.children(state.node)
            return kids.row, kids.code, kids.node
        parts = []
        for p in np.unique(state.prompt):
            beam_idx = np.flatnonzero(state.prompt == p)
            kids = self.trie.children(state.node[beam_idx], filters[p])
            parts.append((beam_idx[kids.row], kids.code, kids.node))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        return tuple(np.concatenate(x) for x in zip(*parts))  # type: ignore[return-value]

    def finish(self, state: BeamState, batch_size: int, ks: Sequence[int]) -> list[list[ScoredItem]]:
        """Top-k finished items per prompt, best first (state must be at full depth)."""
        if state.depth != self.depth:
            raise ValueError(f"beams are at depth {state.depth}, IDs have {self.depth} tokens")
        out: list[list[ScoredItem]] = [[] for _ in range(batch_size)]
        for prompt, node, score in zip(state.prompt, state.node, state.score):  # already sorted per prompt
            if len(out[prompt]) < ks[prompt]:
                out[prompt].append(ScoredItem(index=int(self.trie.node_item[node]), score=float(score)))
        return out


def request_bias(prior: TransitionPrior | None, trie: ItemTrie, history: Sequence[int] | None,
                 exclude: Iterable[int] = (), allow: Iterable[int] | None = None) -> NodeFusion | None:
    """The prior term a request decodes with (its mass over the items the request may get), when the
    bundle has a prior and the request carries its history (EngineRequest.history); else None."""
    if prior is None or history is None:
        return None
    return prior.node_fusion(history, trie, exclude, allow)


def stack_biases(biases: Sequence[NodeFusion | None] | None, num_nodes: int) -> StackedFusion | None:
    """Per-prompt prior terms as one batch; None when no prompt has one."""
    present = [b for b in biases or () if b is not None]
    if not present:
        return None
    kinds = {b.model_log_weight is not None for b in present}
    if len(kinds) > 1:
        raise ValueError("one batch cannot mix product and mixture fusion")
    mixture = kinds == {True}
    rows = len(biases)  # type: ignore[arg-type]
    # Rows without a prior score by the model alone: a product adds 0, a mixture logaddexp(-inf, 0 + model).
    term = np.full((rows, num_nodes), -np.inf if mixture else 0.0)
    weight = np.zeros(rows) if mixture else None
    for row, b in enumerate(biases):  # type: ignore[arg-type]
        if b is not None:
            term[row] = b.term
            if weight is not None:
                weight[row] = b.model_log_weight
    return StackedFusion(term, weight)


def beam_widths(ks: Sequence[int], num_beams: Sequence[int | None], default_beams: int) -> list[int]:
    return [max(k, nb or default_beams) for k, nb in zip(ks, num_beams)]
