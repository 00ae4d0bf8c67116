"""The issue's acceptance check for reasoning chains, for any engine: random histories of 3-8 catalog
items, each chain validated (grounded mentions, no word 4-gram more than twice, >= 12 words, the five
sections) and its finish reason counted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_store.grounding import GroundingIndex, validate_chain
from model_store.tokens import reasoning_prompt
from service.engine.base import EngineRequest, ReasoningDelta, ReasoningDone


@dataclass
class ChainReport:
    chains: int = 0
    valid: int = 0
    closed: int = 0
    failures: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def valid_share(self) -> float:
        return self.valid / max(1, self.chains)

    @property
    def closed_share(self) -> float:
        return self.closed / max(1, self.chains)


async def sample_chains(engine: Any, bundle: Any, n: int = 40, budget: int = 200, seed: int = 0,
                        concurrency: int = 4) -> ChainReport:
    """`n` chains, `concurrency` at a time (within the engines' default reasoning limit)."""
    index = GroundingIndex(bundle)
    rng = np.random.default_rng(seed)
    histories = [[int(i) for i in rng.choice(len(bundle.items), int(rng.integers(3, 9)), replace=False)]
                 for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)

    async def one(r: int, history: list[int]) -> tuple[str, ReasoningDone]:
        request = EngineRequest(f"chain-{seed}-{r}", reasoning_prompt([bundle.spelled_id(i) for i in history]), k=5)
        text, done = "", None
        async with gate:
            async for event in engine.reason(request, budget):
                if isinstance(event, ReasoningDelta):
                    text += event.text
                elif isinstance(event, ReasoningDone):
                    done = event
        assert done is not None
        return text, done

    report = ChainReport()
    results = await asyncio.gather(*(one(r, h) for r, h in enumerate(histories)))
    for history, (text, done) in zip(histories, results, strict=True):
        problems = validate_chain(text, index.names_of(history), index.names_of([i.index for i in done.items]),
                                  catalog=index)
        report.chains += 1
        report.valid += not problems
        report.closed += done.finish_reason == "end_of_thinking"
        if problems:
            report.failures.append((text, problems))
    return report
