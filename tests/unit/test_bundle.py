"""Bundles: save/load round trip, manifest contents, tamper detection, inspect."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from model_store.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    BundleError,
    inspect_bundle,
    load_bundle,
    read_manifest,
    save_bundle,
    verify_bundle,
)
from model_store.catalog import Item
from model_store.tokens import PROMPT_SETTINGS, IdFormat
from tests.support.bundles import make_tiny_bundle

FMT = IdFormat(levels=2, codebook_size=4, dedup_size=8)
N = 60


@pytest.fixture(scope="module")
def parts() -> dict:
    from model_store.tokenizer import train_catalog_tokenizer

    rng = np.random.default_rng(0)
    flat = rng.choice(4 * 4 * 8, N, replace=False)
    codes = np.stack([flat // 32, (flat // 8) % 4, flat % 8], 1).astype(np.int32)
    items = [Item(item_id=f"it-{i}", title=f"Thing {i}", brand="Acme" if i % 2 else "",
                  categories="A > B" if i % 3 else "", description=f"desc {i}") for i in range(N)]
    return {
        "items": items,
        "codes": codes,
        "codebooks": rng.normal(size=(2, 4, 5)).astype(np.float32),
        "popularity": rng.integers(0, 9, N).astype(np.float32),
        "tokenizer": train_catalog_tokenizer([it.title for it in items], FMT, vocab_size=300),
    }


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    return save_bundle(out, id_format=FMT, settings={"note": "test"}, stats={"items": N}, **parts)


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(saved, parts) -> None:
    b = load_bundle(saved)
    assert b.items == parts["items"]
    np.testing.assert_array_equal(b.codes, parts["codes"])
    assert b.codes.dtype == np.int32
    np.testing.assert_array_equal(b.codebooks, parts["codebooks"])
    np.testing.assert_array_equal(b.popularity, parts["popularity"])
    assert b.id_format == FMT
    assert b.index_of["it-7"] == 7
    assert b.spelled_id(3) == FMT.spell(parts["codes"][3])
    # The stored trie reaches every item at its ID.
    for i, row in enumerate(parts["codes"]):
        assert b.trie.item_at(row) == i
    assert b.trie.num_items == N
    assert not b.has_model
    with pytest.raises(BundleError, match="no model"):
        _ = b.model_path
    from transformers import PreTrainedTokenizerFast  # AutoTokenizer would import torch: slow

    tok = PreTrainedTokenizerFast.from_pretrained(str(b.tokenizer_path), local_files_only=True)
    assert tok.tokenize(b.spelled_id(0)) == [FMT.token(lv, int(c)) for lv, c in enumerate(parts["codes"][0])]


def test_manifest_fields(saved) -> None:
    m = read_manifest(saved)
    assert m["format_version"] == FORMAT_VERSION == 1
    assert isinstance(m["bundle_version"], str) and m["bundle_version"]
    assert m["bundle_version"].endswith(m["content_sha256"][:8])
    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    assert m["id_format"] == FMT.to_dict()
    assert m["prompt_format"] == json.loads(json.dumps(PROMPT_SETTINGS))
    assert m["has_model"] is False
    assert m["settings"] == {"note": "test"} and m["stats"] == {"items": N}
    expected = {"items.jsonl", "semantic_ids.npy", "codebooks.npy", "trie.npz", "popularity.npy"}
    assert expected <= set(m["files"])
    assert any(name.startswith("tokenizer/") for name in m["files"])
    assert MANIFEST not in m["files"]
    for name, digest in m["files"].items():
        assert digest == hashlib.sha256((saved / name).read_bytes()).hexdigest()
    assert verify_bundle(saved) == []


def test_explicit_version_and_defaults(parts, tmp_path) -> None:
    out = save_bundle(tmp_path / "v", id_format=FMT, version="my-version-1",
                      **{**parts, "popularity": None})
    b = load_bundle(out)
    assert b.version == "my-version-1"
    np.testing.assert_array_equal(b.popularity, np.zeros(N, np.float32))
    assert b.popular(3) == [0, 1, 2]  # ties keep catalog order


def test_popular_order_and_exclusions(saved, parts) -> None:
    b = load_bundle(saved)
    top = b.popular(5, exclude={int(np.argmax(parts["popularity"]))})
    pops = parts["popularity"]
    assert int(np.argmax(pops)) not in top
    assert list(pops[top]) == sorted(pops[top], reverse=True)


def test_refuses_to_overwrite(saved, parts, tmp_path) -> None:
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(saved, id_format=FMT, **parts)
    assert verify_bundle(saved) == []  # untouched
    out = tmp_path / "o"
    out.mkdir()
    (out / "junk").write_text("x")
    save_bundle(out, id_format=FMT, overwrite=True, **parts)
    assert not (out / "junk").exists() and verify_bundle(out) == []


def test_failed_save_leaves_nothing(parts, tmp_path) -> None:
    class BadTokenizer:
        def save_pretrained(self, path: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_bundle(tmp_path / "x", id_format=FMT, **{**parts, "tokenizer": BadTokenizer()})
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a temporary folder
    with pytest.raises(BundleError, match="semantic IDs"):
        save_bundle(tmp_path / "y", id_format=FMT, **{**parts, "codes": parts["codes"][:-1]})


# ------------------------------------------------------------------------------------------ tampering


def test_edited_byte_is_detected(copy) -> None:
    path = copy / "items.jsonl"
    data = bytearray(path.read_bytes())
    data[data.index(b"Thing")] = ord("t")  # still valid JSON, one byte changed
    path.write_bytes(bytes(data))
    assert verify_bundle(copy) == ["hash mismatch for items.jsonl: the file was changed after the bundle was built"]
    with pytest.raises(BundleError) as info:
        load_bundle(copy)
    assert "items.jsonl" in str(info.value) and "failed verification" in str(info.value)
    load_bundle(copy, verify=False)  # explicitly skipping verification still loads


@pytest.mark.parametrize("name", ["trie.npz", "semantic_ids.npy", "tokenizer/tokenizer.json"])
def test_edited_binary_or_nested_file_is_detected(copy, name) -> None:
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"hash mismatch for {name}"):
        load_bundle(copy)


def test_deleted_file_is_detected(copy) -> None:
    (copy / "popularity.npy").unlink()
    with pytest.raises(BundleError, match="missing file popularity.npy"):
        load_bundle(copy)


def test_unexpected_file_is_detected(copy) -> None:
    (copy / "extra.bin").write_bytes(b"\0")
    (copy / "tokenizer" / "added.json").write_text("{}")
    problems = verify_bundle(copy)
    assert problems == ["unexpected file extra.bin (not in the manifest)",
                        "unexpected file tokenizer/added.json (not in the manifest)"]
    with pytest.raises(BundleError, match="extra.bin"):
        load_bundle(copy)


def test_several_problems_all_reported(copy) -> None:
    (copy / "popularity.npy").unlink()
    (copy / "codebooks.npy").write_bytes(b"x")
    (copy / "stray").write_text("x")
    problems = verify_bundle(copy)
    assert len(problems) == 3
    with pytest.raises(BundleError) as info:
        load_bundle(copy)
    for word in ("popularity.npy", "codebooks.npy", "stray"):
        assert word in str(info.value)


def test_edited_manifest_hash_is_detected(copy) -> None:
    m = json.loads((copy / MANIFEST).read_text())
    m["files"]["items.jsonl"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="hash mismatch for items.jsonl"):
        load_bundle(copy)


def test_unsupported_format_version(copy) -> None:
    m = json.loads((copy / MANIFEST).read_text())
    m["format_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 99 is not supported"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not supported"):
        load_bundle(copy, verify=False)


def test_missing_or_broken_manifest(copy, tmp_path) -> None:
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match="is not a bundle"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="is not a bundle"):
        load_bundle(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ inspect


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny") / "b", n_items=200, with_model=False)


def test_inspect_fields(built) -> None:
    b = load_bundle(built)
    info = inspect_bundle(b)
    json.dumps(info)  # printable as JSON
    assert info["items"] == 200 and info["unique_ids"] == 200
    assert info["levels"] == 3 and info["codebook_size"] == 8 and info["dedup_size"] == 16
    assert info["trie_leaves"] == 200
    assert info["trie_nodes"] == b.trie.num_nodes
    _, counts = np.unique(b.codes[:, :-1], axis=0, return_counts=True)
    assert info["collisions_before_dedup"] == int((counts - 1).sum())
    assert info["max_dedup_depth"] == int(counts.max())
    usage = info["codebook_usage"]
    assert len(usage) == 3 and all(0 < u <= 1 for u in usage)
    assert usage == [len(np.unique(b.codes[:, lv])) / 8 for lv in range(3)]
    assert info["bundle_version"] == b.version and info["format_version"] == 1
    assert info["has_model"] is False
    assert info["prompt_format"] == PROMPT_SETTINGS["version"]
    assert info["embedding"]["dim"] == 16


def test_built_bundle_round_trip(built) -> None:
    b = load_bundle(built)
    assert [it.item_id for it in b.items] == [f"sku-{i}" for i in range(200)]
    assert len(np.unique(b.codes, axis=0)) == 200
    for i in range(0, 200, 7):
        assert b.trie.item_at(b.codes[i]) == i
    assert b.manifest["stats"]["items"] == 200
