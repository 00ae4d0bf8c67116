"""The engine interface: everything the gateway knows about the model runtime.

An engine owns a bundle's tokenizer, model and trie. It turns a prompt into the top-k catalog items by
trie-constrained beam search, scored as docs/architecture.md says: the sum of the model's raw log-probs
(softmax over the whole vocabulary) of the item's ID tokens, plus, when the bundle ships a
collaborative prior and the request carries the history, `strength * log p_prior(item)`
(model_store.prior). Engines differ only in how they run the
model (in-process transformers, in-process vLLM, a remote worker over HTTP).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str  # built by the recommender from model_store.tokens templates
    k: int
    exclude: frozenset[int] = frozenset()  # item indices the decoding must not produce
    allow: frozenset[int] | None = None  # when set, the only item indices it may produce
    num_beams: int | None = None  # default: max(k, engine's default beam width)
    # The history as item indices, most recent last: the bundle's collaborative prior (if any) is fused
    # into the scores from it. None decodes with the model alone.
    history: tuple[int, ...] | None = None
    # Reasoning mode: the items after the chain are decoded from this prompt (the request's direct
    # prompt, so the ranking is direct mode's) instead of from the prompt and the chain. None: after
    # the chain, as GREAM's reasoning mode conditions its answer.
    answer_prompt: str | None = None


@dataclass(frozen=True)
class ScoredItem:
    index: int  # item index in the bundle
    score: float  # summed raw log-probability of the ID tokens (+ the prior's term when fused)


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDone:
    items: list[ScoredItem]
    reasoning_tokens: int
    # "end_of_thinking": the chain closed itself; "length": the budget ran out first.
    finish_reason: str = "end_of_thinking"


@dataclass
class EngineStats:
    queue_depth: int = 0
    running: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class EngineOverloaded(RuntimeError):
    """The engine's bounded queue is full; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str = "engine queue is full", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (not started, crashed, remote worker unreachable)."""


class Engine(abc.ABC):
    name: str = "engine"

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and warm it up; `ready` is True afterwards."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def ready(self) -> bool: ...

    @abc.abstractmethod
    async def recommend(self, request: EngineRequest) -> list[ScoredItem]:
        """Top-k items, best first, all distinct, none excluded. Raises EngineOverloaded."""

    @abc.abstractmethod
    def reason(self, request: EngineRequest, max_reasoning_tokens: int
               ) -> AsyncIterator[ReasoningDelta | ReasoningDone]:
        """Stream reasoning text, then the constrained items. Closing the iterator aborts the work."""

    def stats(self) -> EngineStats:
        return EngineStats()
