"""The foundation issue's acceptance check on the real catalog (skipped without it: docs/training.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store.bundle import load_bundle
from service.cli import main


@pytest.mark.shared_data
@pytest.mark.slow
def test_amazon_industrial_bundle(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "amazon"
    assert main(["bundle", "build", "--items", str(shared_data / "items.jsonl"), "--out", str(out),
                 "--interactions", str(shared_data / "train.jsonl")]) == 0
    capsys.readouterr()
    assert main(["bundle", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 3686 and info["unique_ids"] == 3686 and info["trie_leaves"] == 3686
    for key in ("levels", "codebook_size", "collisions_before_dedup", "max_dedup_depth", "codebook_usage"):
        assert key in info
    assert info["levels"] == 3 and info["codebook_size"] == 256 and len(info["codebook_usage"]) == 3
    # Semantic IDs carry meaning: items sharing a first code share a brand far more often than chance.
    assert info["first_code_lift"]["brand"] > 5
    bundle = load_bundle(out)
    assert [bundle.trie.item_at(c) for c in bundle.codes] == list(range(3686))
    assert bundle.popularity.sum() > 0
