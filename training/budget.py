"""The run's time budget: each stage gets its share of the minutes left when it starts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from training.config import BudgetSection


@dataclass
class TimeBudget:
    """Shares of a wall-clock deadline (None: no deadline, every stage runs to its step caps).

    A stage's minutes are decided when it starts, from the time then left, so overruns of earlier
    stages (timing probes, evaluations, snapshots) are absorbed by the later ones; the evaluation
    reserve is kept back from every stage's share."""

    shares: BudgetSection
    stages: Sequence[str]
    deadline: float | None
    clock: Callable[[], float] = time.perf_counter
    given: dict[str, float] = field(default_factory=dict)  # minutes granted so far, by stage

    @classmethod
    def starting(cls, started_at: float, max_minutes: float | None, shares: BudgetSection, stages: Sequence[str],
                 clock: Callable[[], float] = time.perf_counter) -> TimeBudget:
        deadline = started_at + max_minutes * 60 if max_minutes else None
        return cls(shares, list(stages), deadline, clock)

    def stage_minutes(self, stage: str) -> float | None:
        """Minutes for `stage`, starting now (at least 0.2), recorded in `given`."""
        if self.deadline is None:
            return None
        left = [s for s in self.stages if s not in self.given]
        share = self.shares.share(stage) / sum(self.shares.share(s) for s in left)
        minutes = max(0.2, (self.deadline - self.clock()) / 60 * (1 - self.shares.eval_reserve) * share)
        self.given[stage] = minutes
        return minutes
