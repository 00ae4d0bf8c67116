"""Every preset's semantic IDs build for any well-formed catalog, however crowded its prefixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_store.builder import BuildConfig, build_bundle
from model_store.bundle import load_bundle
from model_store.catalog import Item
from training.config import load_config, preset_names
from training.stages.prepare import quantizer_config


@pytest.mark.parametrize("preset", preset_names())
def test_each_preset_builds_ids_for_a_catalog_with_heavy_collisions(preset: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 300 items, 80 of them with one and the same text vector: far more than any preset's
    # de-duplication level holds for one base ID.
    vectors = rng.normal(size=(300, 24)).astype(np.float32)
    vectors[:80] = vectors[0]
    items = [Item(item_id=f"i{i}", title=f"Acme part {i % 7}", brand="Acme", categories="Tools > Parts")
             for i in range(300)]
    # Balanced assignment spreads identical vectors over codes by capacity; plain nearest-centroid
    # assignment keeps them on one base ID, which is the crowding to survive.
    cfg = load_config({"base": preset, "ids": {"balanced": False}})
    build = BuildConfig(quantizer=quantizer_config(cfg), tokenizer_vocab_size=400)
    path, stats = build_bundle(items, tmp_path / preset, build, vectors=vectors, log=lambda *a: None)
    bundle = load_bundle(path)
    assert stats["unique_ids"] == 300
    assert bundle.id_format.dedup_size >= 80 > quantizer_config(cfg).dedup_size
    assert bundle.codes[:, -1].max() < bundle.id_format.dedup_size
