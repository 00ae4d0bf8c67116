"""Registry: versions side by side, an atomically switched `current` symlink, immutability."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from model_store.bundle import MANIFEST, BundleError, load_bundle, read_manifest, save_bundle, verify_bundle
from model_store.catalog import Item
from model_store.registry import Registry, resolve_bundle_dir
from model_store.tokens import IdFormat

FMT = IdFormat(levels=1, codebook_size=8, dedup_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    from model_store.tokenizer import train_catalog_tokenizer

    return train_catalog_tokenizer(["red widget", "blue gadget", "green gizmo"] * 3, FMT, vocab_size=300)


@pytest.fixture(scope="module")
def make(tokenizer, tmp_path_factory):
    """make(version, n_items, seed) -> a small verified bundle folder."""
    root = tmp_path_factory.mktemp("src")
    counter = iter(range(10_000))

    def _make(version: str | None = None, n: int = 10, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        flat = rng.choice(8 * 4, n, replace=False)
        codes = np.stack([flat // 4, flat % 4], 1)
        items = [Item(item_id=str(i), title=f"item {i} seed {seed}") for i in range(n)]
        return save_bundle(root / f"b{next(counter)}", items=items, codes=codes,
                           codebooks=np.zeros((1, 8, 3), np.float32), id_format=FMT, tokenizer=tokenizer,
                           popularity=rng.random(n), stats={"items": n}, version=version)

    return _make


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def hidden_leftovers(reg: Registry) -> list[str]:
    names = [p.name for p in reg.root.iterdir()] if reg.root.exists() else []
    if reg.versions_dir.exists():
        names += [p.name for p in reg.versions_dir.iterdir()]
    return [n for n in names if n.startswith(".")]


def test_empty_registry(reg) -> None:
    assert reg.versions() == []
    assert reg.current() is None and reg.current_version() is None


def test_publish_copies_a_verified_bundle(reg, make) -> None:
    src = make("v1", n=7)
    assert reg.publish(src) == "v1"
    dest = reg.root / "versions" / "v1"
    assert verify_bundle(dest) == []
    assert read_manifest(dest) == read_manifest(src)
    assert verify_bundle(src) == []  # the source is left as it was
    (entry,) = reg.versions()
    assert entry["version"] == "v1" and entry["items"] == 7 and entry["current"] is False
    assert entry["created_at"] == read_manifest(src)["created_at"]
    assert reg.current() is None  # publishing alone does not activate
    assert hidden_leftovers(reg) == []


def test_publish_uses_the_manifest_version(reg, make) -> None:
    src = make(None)
    version = reg.publish(src)
    assert version == read_manifest(src)["bundle_version"]
    assert (reg.versions_dir / version / MANIFEST).is_file()


def test_publish_and_activate(reg, make) -> None:
    reg.publish(make("v1"), activate=True)
    link = reg.root / "current"
    assert link.is_symlink()
    assert os.readlink(link) == os.path.join("versions", "v1")  # relative: the folder can move
    assert reg.current() == reg.versions_dir / "v1"
    assert reg.current_version() == "v1"
    assert [v["current"] for v in reg.versions()] == [True]
    assert load_bundle(reg.current()).version == "v1"


def test_republish_identical_is_a_no_op_but_different_content_is_refused(reg, make) -> None:
    src = make("v1", seed=1)
    reg.publish(src)
    copy = src.parent / "copy-of-v1"
    shutil.copytree(src, copy)
    assert reg.publish(copy) == "v1"
    assert len(reg.versions()) == 1
    other = make("v1", seed=2)  # same version name, other content
    with pytest.raises(BundleError, match="already published with different content"):
        reg.publish(other)
    assert read_manifest(reg.versions_dir / "v1") == read_manifest(src)
    assert hidden_leftovers(reg) == []


def test_publish_refuses_broken_bundles(reg, make, tmp_path) -> None:
    src = make("bad")
    (src / "items.jsonl").write_text('{"item_id": 0, "title": "changed"}\n')
    with pytest.raises(BundleError, match="refusing to publish.*\n.*items.jsonl"):
        reg.publish(src)
    with pytest.raises(BundleError, match="no such bundle folder"):
        reg.publish(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a bundle"):
        reg.publish(tmp_path / "empty")
    assert reg.versions() == [] and hidden_leftovers(reg) == []


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "current", ".."])
def test_publish_refuses_unsafe_version_names(reg, make, name) -> None:
    with pytest.raises(BundleError, match="not a usable bundle version"):
        reg.publish(make(name))
    assert reg.versions() == []


def test_activate_switches_and_lists(reg, make) -> None:
    reg.publish(make("v1"))
    reg.publish(make("v2", n=12, seed=3), activate=True)
    assert reg.current_version() == "v2"
    reg.activate("v1")
    assert reg.current() == reg.versions_dir / "v1"
    listed = {v["version"]: v for v in reg.versions()}
    assert listed["v1"]["current"] and not listed["v2"]["current"]
    assert listed["v2"]["items"] == 12
    assert hidden_leftovers(reg) == []  # the temporary symlink was renamed, not left behind


def test_activate_unknown_or_tampered_version(reg, make) -> None:
    reg.publish(make("v1"), activate=True)
    reg.publish(make("v2", seed=4))
    with pytest.raises(BundleError, match="no version 'nope'.*v1, v2"):
        reg.activate("nope")
    (reg.versions_dir / "v2" / "popularity.npy").unlink()
    with pytest.raises(BundleError, match="refusing to activate v2.*\n.*popularity.npy"):
        reg.activate("v2")
    assert reg.current_version() == "v1"


def test_remove(reg, make) -> None:
    reg.publish(make("v1"), activate=True)
    reg.publish(make("v2", seed=5))
    with pytest.raises(BundleError, match="v1 is the current version"):
        reg.remove("v1")
    reg.remove("v2")
    assert [v["version"] for v in reg.versions()] == ["v1"]
    assert not (reg.versions_dir / "v2").exists() and hidden_leftovers(reg) == []
    with pytest.raises(BundleError, match="no version 'v2'"):
        reg.remove("v2")
    with pytest.raises(BundleError, match="not a usable"):
        reg.remove("../v1")
    assert reg.current_version() == "v1"


def test_current_pointer_problems(reg, make) -> None:
    reg.publish(make("v1"), activate=True)
    shutil.rmtree(reg.versions_dir / "v1")  # removed behind the registry's back
    with pytest.raises(BundleError, match="not a published bundle"):
        reg.current()
    (reg.root / "current").unlink()
    (reg.root / "current").mkdir()
    with pytest.raises(BundleError, match="not a symlink"):
        reg.current()
    reg.publish(make("v2", seed=6))
    with pytest.raises(BundleError, match="not a symlink"):
        reg.activate("v2")


def test_registry_folder_can_move(reg, make, tmp_path) -> None:
    reg.publish(make("v1"), activate=True)
    moved = tmp_path / "elsewhere"
    shutil.copytree(reg.root, moved, symlinks=True)
    other = Registry(moved)
    assert other.current() == moved / "versions" / "v1"
    assert load_bundle(other.current()).version == "v1"


def test_resolve_bundle_dir(reg, make, tmp_path) -> None:
    src = make("v1")
    assert resolve_bundle_dir(src) == src
    reg.publish(src)
    with pytest.raises(BundleError, match="no current version"):
        resolve_bundle_dir(reg.root)
    reg.activate("v1")
    assert resolve_bundle_dir(reg.root) == reg.versions_dir / "v1"
    with pytest.raises(BundleError, match="neither a bundle"):
        resolve_bundle_dir(tmp_path)


def test_readers_never_see_a_missing_current_while_switching(reg, make) -> None:
    reg.publish(make("v1"), activate=True)
    reg.publish(make("v2", seed=7))
    link = reg.root / "current"
    stop = threading.Event()
    seen: set[str] = set()
    failures: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add((link / MANIFEST).resolve(strict=True).parent.name)
            except OSError as exc:  # a missing or half-made pointer would land here
                failures.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            reg.activate("v2" if i % 2 == 0 else "v1")
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert seen <= {"v1", "v2"}
    assert hidden_leftovers(reg) == []
