"""The run's time budget, on a clock the test moves: each stage's share of the minutes left."""

from __future__ import annotations

import pytest

from training.budget import TimeBudget
from training.config import BudgetSection
from training.recipe import recipe_stages

SHARES = BudgetSection(align=0.5, reason=0.3, srpo=0.2, eval_reserve=0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_stage_gets_its_share_of_what_is_left() -> None:
    clock = Clock()
    budget = TimeBudget.starting(clock.now, 10.0, SHARES, ["align", "reason", "srpo"], clock)
    assert budget.stage_minutes("align") == pytest.approx(10 * 0.9 * 0.5)
    clock.now += 4.5 * 60  # align used its share exactly
    assert budget.stage_minutes("reason") == pytest.approx(5.5 * 0.9 * 0.3 / 0.5)
    clock.now += 60 * 5.5 * 0.9 * 0.3 / 0.5 + 60  # reason overran by a minute: srpo absorbs it
    left = 10 - 4.5 - 5.5 * 0.9 * 0.3 / 0.5 - 1
    assert budget.stage_minutes("srpo") == pytest.approx(left * 0.9)
    assert list(budget.given) == ["align", "reason", "srpo"]


def test_shares_are_of_the_stages_that_run() -> None:
    clock = Clock()
    budget = TimeBudget.starting(clock.now, 10.0, SHARES, ["align", "srpo"], clock)
    assert budget.stage_minutes("align") == pytest.approx(10 * 0.9 * 0.5 / 0.7)


def test_a_late_stage_still_gets_a_minimum() -> None:
    clock = Clock()
    budget = TimeBudget.starting(clock.now, 1.0, SHARES, ["align"], clock)
    clock.now += 120  # already past the deadline
    assert budget.stage_minutes("align") == 0.2


def test_no_deadline_means_no_time_limit() -> None:
    budget = TimeBudget.starting(0.0, None, SHARES, ["align", "reason", "srpo"])
    assert budget.stage_minutes("align") is None and budget.given == {}


def test_stages_run_in_recipe_order_and_unknown_ones_are_refused() -> None:
    assert recipe_stages(["srpo", "align"]) == ["align", "srpo"]
    with pytest.raises(ValueError, match="unknown stage"):
        recipe_stages(["align", "polish"])
    with pytest.raises(ValueError):
        recipe_stages([])
