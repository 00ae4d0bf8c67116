"""The recommender's request plan: the prompt holds the history window the bundle's model was trained
on (eval reads the same window), while exclusions still cover the whole history."""

from __future__ import annotations

import pytest

from model_store.bundle import load_bundle
from service.history import InMemoryHistoryStore
from service.recommender import Query, Recommender
from tests.support.bundles import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("plan") / "b", n_items=50, with_model=False))


async def test_prompt_window_comes_from_the_bundle(bundle) -> None:  # type: ignore[no-untyped-def]
    assert bundle.prompt_history is None  # built, not trained: nothing recorded
    history = [f"sku-{i}" for i in range(12)]
    unbounded = await Recommender(bundle, None, InMemoryHistoryStore()).plan(Query(history=history), "r1")  # type: ignore[arg-type]
    assert len(unbounded.history) == 12

    bundle.manifest["stats"]["training"] = {"config": {"align": {"max_history": 5}}}  # older bundles
    assert bundle.prompt_history == 5
    bundle.manifest["settings"]["prompt_history"] = 3
    assert bundle.prompt_history == 3
    rec = Recommender(bundle, None, InMemoryHistoryStore(), use_prior=True)  # type: ignore[arg-type]
    plan = await rec.plan(Query(history=history), "r2")
    assert plan.history == [9, 10, 11]
    assert plan.exclude == frozenset(range(12)), "exclude_seen still covers the whole history"
    request = rec.engine_request(plan)
    assert request.history == (9, 10, 11) and request.prompt.count("<a_") == 3
    assert Recommender(bundle, None, InMemoryHistoryStore(), use_prior=False  # type: ignore[arg-type]
                       ).engine_request(plan).history is None
