"""Batched reasoning generation under the serving constraint, for evaluation: Hugging Face `generate`
with a logits processor that runs each row's chain automaton (model_store.chain_automaton), so the
chains `gream eval --mode reasoning` measures are the chains the service streams."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from model_store.chain_automaton import ChainAutomaton, ChainGrounding
from model_store.grounding import ItemNames


class GroundedChains:
    """A `transformers` logits processor over a left-padded batch whose prompts are `prompt_width`
    tokens wide: row i follows the automaton of `histories[i]`. Records when the first token was due
    (time to first token of the batch)."""

    def __init__(self, grounding: ChainGrounding, histories: Sequence[Sequence[ItemNames]], prompt_width: int,
                 budget: int):
        self.vocab = grounding.vocab
        self.chains = [ChainAutomaton(grounding.vocab, grounding.spec(h, budget)) for h in histories]
        self.width = prompt_width
        self.closed = [False] * len(self.chains)
        self.started = time.perf_counter()
        self.first_token_s: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        new = input_ids[:, self.width:].tolist()
        masks = []
        for row, chain in enumerate(self.chains):
            for token in new[row][len(chain.generated) + self.closed[row]:]:
                if token == self.vocab.think_end:
                    self.closed[row] = True
                    break
                chain.advance(int(token))
            masks.append(torch.from_numpy(chain.allowed()))
        allowed = torch.stack(masks)
        if allowed.shape[1] < scores.shape[1]:
            allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], scores.shape[1] - allowed.shape[1])], 1)
        closed = torch.tensor(self.closed)[:, None]  # finished rows are padded by generate: leave them be
        return scores.masked_fill(~(allowed | closed).to(scores.device), float("-inf"))


def grounding_for(model: Any, tokenizer: Any, index: Any) -> ChainGrounding:
    """The constraint for `model`'s whole output layer."""
    return ChainGrounding(index, tokenizer, int(model.get_output_embeddings().weight.shape[0]))
