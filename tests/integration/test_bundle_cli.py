"""`gream bundle ...` end to end on a small well-formed catalog with the real sentence embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_store.bundle import load_bundle
from service.cli import main

WORDS = ["pipette", "beaker", "glove", "scale", "funnel", "clamp", "tape", "sensor", "valve", "drill"]


def write_catalog(path: Path, n: int, start: int = 0) -> Path:
    rows = [{"item_id": f"p{i}", "title": f"{WORDS[i % 10]} number {i}", "brand": f"brand{i % 4}",
             "categories": ["Lab", WORDS[i % 10]], "price": 3.5} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "bundle"
    code = main(["bundle", "build", "--items", str(write_catalog(tmp / "items.jsonl", 120)), "--out", str(out),
                 "--levels", "2", "--codebook-size", "16"])
    assert code == 0
    return out


def test_build_inspect_json(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "inspect", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == info["unique_ids"] == info["trie_leaves"] == 120
    assert info["levels"] == 2 and info["codebook_size"] == 16
    assert len(info["codebook_usage"]) == 2 and all(0 < u <= 1 for u in info["codebook_usage"])
    assert info["collisions_before_dedup"] >= 0 and info["max_dedup_depth"] >= 1


def test_every_item_reachable(built: Path) -> None:
    bundle = load_bundle(built)
    assert [bundle.trie.item_at(c) for c in bundle.codes] == list(range(len(bundle.items)))


def test_verify_detects_tampering(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    assert main(["bundle", "verify", str(copy)]) == 0
    with (copy / "items.jsonl").open("a") as fh:
        fh.write("\n")
    assert main(["bundle", "verify", str(copy)]) == 1
    assert "items.jsonl" in capsys.readouterr().err


def test_add_items_keeps_existing_ids(built: Path, tmp_path: Path) -> None:
    new = write_catalog(tmp_path / "new.jsonl", 10, start=500)
    out = tmp_path / "v2"
    assert main(["bundle", "add-items", str(built), "--items", str(new), "--out", str(out)]) == 0
    old, grown = load_bundle(built), load_bundle(out)
    assert len(grown.items) == 130
    assert np.array_equal(grown.codes[:120], old.codes)
    assert len(np.unique(grown.codes, axis=0)) == 130
    assert np.array_equal(grown.codebooks, old.codebooks, equal_nan=True)
    assert grown.manifest["stats"]["parent_bundle"] == old.version


def test_add_items_refuses_existing_id(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dup = write_catalog(tmp_path / "dup.jsonl", 3, start=0)
    assert main(["bundle", "add-items", str(built), "--items", str(dup), "--out", str(tmp_path / "x")]) == 2
    assert "already exist" in capsys.readouterr().err


def test_bad_catalog_names_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": 1, "title": "ok"}\n{"item_id": 2}\n{not json\n{"item_id": 1, "title": "dup"}\n')
    assert main(["bundle", "build", "--items", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and "line 4" in err and "nothing was built" in err
    assert not (tmp_path / "b").exists()


def test_add_items_carries_the_prior(built: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from model_store.bundle import save_bundle
    from model_store.prior import TransitionPrior

    old = load_bundle(built)
    prior = TransitionPrior.fit([[i, i + 1] for i in range(0, 118, 2)], len(old.items))
    with_prior = save_bundle(tmp_path / "with-prior", items=old.items, codes=old.codes, codebooks=old.codebooks,
                             id_format=old.id_format, tokenizer=AutoTokenizer.from_pretrained(str(old.tokenizer_path)),
                             popularity=old.popularity, settings=old.manifest["settings"], prior=prior)
    out = tmp_path / "v2"
    assert main(["bundle", "add-items", str(with_prior), "--items", str(write_catalog(tmp_path / "n.jsonl", 5, 700)),
                 "--out", str(out)]) == 0
    grown = load_bundle(out)
    assert grown.prior is not None and grown.prior.num_items == 125
    assert int(grown.prior.p1[4].toarray().argmax()) == 5  # counted transitions survive
    assert grown.prior.p1[120:].nnz == 0  # new items have none yet
    assert grown.manifest["prior"] == prior.settings.to_dict()
