"""Reasoning chains of the transformers engine on the tiny bundle (a random-weight model: whatever it
prefers, the decoding constraint alone must make its chains faithful and closed)."""

from __future__ import annotations

from typing import Any

import pytest

from loadtests.chain_quality import sample_chains

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_chains_are_grounded_and_closed(gw_engine: Any, gw_bundle: Any) -> None:
    report = await sample_chains(gw_engine, gw_bundle, n=40, budget=200)
    assert report.valid_share >= 0.95, report.failures[:3]
    assert report.closed_share >= 0.90
