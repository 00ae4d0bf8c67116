"""Reasoning generation for the transformers engine, one token per step, so that streams interleave
fairly with top-k batches on the decode workers and stop as soon as their consumer goes away (the next
step is simply never submitted). Every method runs on a worker thread.

Each step is masked by the request's chain automaton (model_store.chain_automaton): fixed sections,
mentions only of what the history holds, no repetition loops, closed by THINK_END within the budget."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_store.bundle import Bundle
from model_store.chain_automaton import ChainAutomaton, ChainGrounding
from model_store.grounding import GroundingIndex, ItemNames
from model_store.tokens import THINK_END, reasoning_answer_suffix, reasoning_prompt

FINISH_END_OF_THINKING = "end_of_thinking"
FINISH_LENGTH = "length"


@dataclass
class ReasoningSession:
    """One reasoning generation; touched only by its worker thread, except `cancelled`."""

    request_id: str
    prompt_ids: list[int]
    budget: int
    cache: Any = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    finished: bool = False
    finish_reason: str = FINISH_LENGTH
    chain: ChainAutomaton | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class ReasoningRecord:
    """What became of a reasoning request (kept for stats and tests)."""

    request_id: str
    tokens: int
    budget: int
    outcome: str  # "done" | "cancelled" | "error"


class ReasoningDecoder:
    """Greedy (or sampled) free-text decoding with the bundle's model, ended by THINK_END or the budget."""

    def __init__(self, model: Any, tokenizer: Any, bundle: Bundle, tokenizer_lock: threading.Lock,
                 temperature: float = 0.0, seed: int = 0, grounding: GroundingIndex | None = None):
        self.model, self.tokenizer, self.bundle = model, tokenizer, bundle
        self.temperature = temperature
        self._tokenizer_lock = tokenizer_lock  # a fast tokenizer is not safe to call from two threads at once
        self._generator = torch.Generator().manual_seed(seed)
        self.think_end = int(tokenizer.convert_tokens_to_ids(THINK_END))
        self.suffix_ids = self.encode(reasoning_answer_suffix())
        self._max_positions = int(getattr(model.config, "max_position_embeddings", 4096))
        # The chain's masks cover the whole output layer: rows past the tokenizer are never free text.
        vocab = int(model.get_output_embeddings().weight.shape[0])
        self.grounding = ChainGrounding(grounding or GroundingIndex(bundle), tokenizer, vocab, self.encode)

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, spelled_history: Sequence[str]) -> list[int]:
        return self.encode(reasoning_prompt(spelled_history))

    def history(self, prompt: str) -> list[ItemNames]:
        return self.grounding.history(prompt)

    def answer_ids(self, session: ReasoningSession) -> list[int]:
        """The prompt for the items that follow the reasoning (decoded as in direct mode)."""
        return session.prompt_ids + session.generated + self.suffix_ids

    def prefill(self, request_id: str, prompt_ids: list[int], max_tokens: int,
                history: Sequence[ItemNames] = ()) -> ReasoningSession:
        """`history`: the items the chain may name and cite (`history(prompt)`)."""
        # Leave room in the position table for the answer suffix and the ID tokens.
        room = self._max_positions - len(prompt_ids) - len(self.suffix_ids) - self.bundle.trie.depth
        session = ReasoningSession(request_id, prompt_ids, budget=max(0, min(max_tokens, room)))
        session.chain = ChainAutomaton(self.grounding.vocab, self.grounding.spec(history, session.budget))
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        session.cache, session.logits = out.past_key_values, out.logits[0, -1]
        session.finished = session.budget == 0
        return session

    def step(self, session: ReasoningSession) -> str:
        """Pick one token; run the model on it unless it ends the reasoning. Returns new text."""
        if session.cancelled.is_set() or session.finished:
            session.finished = True
            return ""
        assert session.logits is not None and session.chain is not None
        allowed = torch.from_numpy(session.chain.allowed())
        logits = session.logits.float().masked_fill(~allowed, float("-inf"))
        if self.temperature > 0:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self._generator))
        else:
            token = int(torch.argmax(logits))
        if token == self.think_end:
            session.finished, session.finish_reason = True, FINISH_END_OF_THINKING
            return ""
        session.generated.append(token)
        session.chain.advance(token)
        if len(session.generated) >= session.budget:
            session.finished = True
        else:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=session.cache, use_cache=True)
            session.cache, session.logits = out.past_key_values, out.logits[0, -1]
        return self._new_text(session, final=False)

    def flush_text(self, session: ReasoningSession) -> str:
        return self._new_text(session, final=True)

    def _new_text(self, session: ReasoningSession, final: bool) -> str:
        with self._tokenizer_lock:
            text = self.tokenizer.decode(session.generated, skip_special_tokens=False)
        # A byte-level token may end inside a UTF-8 character: hold it back until it completes.
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(session.emitted):
            return ""  # detokenisation re-segmented earlier text; never rewrite what was sent
        delta, session.emitted = text[len(session.emitted):], text
        return delta
