"""The wire format between a gateway's `RemoteEngine` and an engine worker's internal routes.

Gateway and workers must serve the same bundle version: item indices travel, not item ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from service.engine.base import EngineRequest, ScoredItem


class WireRequest(BaseModel):
    request_id: str
    prompt: str
    k: int = Field(ge=1)
    exclude: list[int] = Field(default_factory=list)
    allow: list[int] | None = None
    num_beams: int | None = None
    history: list[int] | None = None  # item indices, for the bundle's collaborative prior
    answer_prompt: str | None = None  # reasoning: the prompt the items are decoded from (None: after the chain)
    max_reasoning_tokens: int | None = Field(None, ge=1)
    # The bundle version the gateway planned the request for: a worker serving another one refuses it
    # (409), so item indices never cross versions.
    model_version: str | None = None

    @classmethod
    def of(cls, request: EngineRequest, max_reasoning_tokens: int | None = None,
           model_version: str | None = None) -> WireRequest:
        return cls(request_id=request.request_id, prompt=request.prompt, k=request.k, model_version=model_version,
                   exclude=sorted(request.exclude), allow=None if request.allow is None else sorted(request.allow),
                   num_beams=request.num_beams, max_reasoning_tokens=max_reasoning_tokens,
                   history=None if request.history is None else list(request.history),
                   answer_prompt=request.answer_prompt)

    def engine_request(self) -> EngineRequest:
        return EngineRequest(request_id=self.request_id, prompt=self.prompt, k=self.k,
                             exclude=frozenset(self.exclude),
                             allow=None if self.allow is None else frozenset(self.allow), num_beams=self.num_beams,
                             history=None if self.history is None else tuple(self.history),
                             answer_prompt=self.answer_prompt)


def items_from_wire(raw: Sequence[dict[str, Any]]) -> list[ScoredItem]:
    return [ScoredItem(index=int(r["index"]), score=float(r["score"])) for r in raw]


def items_to_wire(items: Sequence[ScoredItem]) -> list[dict[str, Any]]:
    return [{"index": i.index, "score": i.score} for i in items]
