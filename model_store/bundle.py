"""Bundles: the versioned folder a server loads (items, semantic IDs, trie, tokenizer, model).

Layout:
    manifest.json       format and bundle version, creation time, settings, stats, sha256 of every file
    items.jsonl         the catalog, in item-index order
    semantic_ids.npy    int32 [items, levels + 1]
    codebooks.npy       float32 [levels, codebook_size, dim] (for adding items later)
    trie.npz            flat trie arrays (model_store.trie)
    popularity.npy      float32 [items] interaction counts (fallback for users without history)
    prior.npz           optional collaborative prior (model_store.prior), settings in the manifest
    tokenizer/          Hugging Face tokenizer with the ID and special tokens
    model/              Hugging Face causal LM (config.json + model.safetensors), when trained

Bundles are immutable: they are written to a temporary folder and renamed into place, and loading
checks every file's hash, so a half-written or edited bundle is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from model_store.catalog import Item, read_catalog, write_catalog
from model_store.prior import PriorSettings, TransitionPrior
from model_store.semantic_ids import id_stats, prefix_coherence
from model_store.tokens import PROMPT_SETTINGS, IdFormat
from model_store.trie import ItemTrie

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"
PRIOR_FILE = "prior.npz"


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, tampered with, or of an unsupported format."""


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    items: list[Item]
    codes: np.ndarray
    codebooks: np.ndarray
    trie: ItemTrie
    popularity: np.ndarray
    prior: TransitionPrior | None = None  # fused into decoding when present (model_store.prior)
    index_of: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index_of = {item.item_id: i for i, item in enumerate(self.items)}

    @cached_property
    def id_format(self) -> IdFormat:
        return IdFormat.from_dict(self.manifest["id_format"])

    @cached_property
    def _spelled(self) -> list[str]:
        # Every request spells its history and its answers: once per bundle, not per call.
        fmt = self.id_format
        return [fmt.spell(c) for c in self.codes]

    @cached_property
    def _popularity_order(self) -> list[int]:
        return [int(i) for i in np.argsort(-self.popularity, kind="stable")]

    @property
    def version(self) -> str:
        return str(self.manifest["bundle_version"])

    @property
    def has_model(self) -> bool:
        return bool(self.manifest.get("has_model"))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def model_path(self) -> Path:
        if not self.has_model:
            raise BundleError(f"bundle {self.path} has no model; train one (gream train) or use gream demo")
        return self.path / MODEL_DIR

    @property
    def prompt_history(self) -> int | None:
        """How many of the newest history items the model was trained to read (None: not recorded)."""
        value = self.manifest.get("settings", {}).get("prompt_history")
        training = self.manifest.get("stats", {}).get("training")
        if value is None and training:  # trained before the setting existed: the training config says
            value = training.get("config", {}).get("align", {}).get("max_history", 10)  # 10: its default then
        return int(value) if value else None

    def spelled_id(self, index: int) -> str:
        return self._spelled[index]

    def popular(self, k: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Most popular item indices (ties: catalog order), skipping `exclude`."""
        out: list[int] = []
        for i in self._popularity_order:
            if len(out) == k:
                break
            if i not in exclude:
                out.append(i)
        return out


# ------------------------------------------------------------------------------------------ hashing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ save


def new_bundle_version(content_digest: str) -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + content_digest[:8]


def save_bundle(out: str | Path, *, items: list[Item], codes: np.ndarray, codebooks: np.ndarray,
                id_format: IdFormat, tokenizer: Any, model: Any | None = None,
                popularity: np.ndarray | None = None, settings: dict[str, Any] | None = None,
                stats: dict[str, Any] | None = None, version: str | None = None,
                prior: TransitionPrior | None = None, overwrite: bool = False) -> Path:
    """Write a complete bundle to `out` atomically (a temporary sibling folder renamed into place)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another --out or pass --overwrite")
    if len(items) != len(codes):
        raise BundleError(f"{len(items)} items but {len(codes)} semantic IDs")
    if prior is not None and prior.num_items != len(items):
        raise BundleError(f"the prior covers {prior.num_items} items, the catalog has {len(items)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_catalog(items, tmp / "items.jsonl")
        np.save(tmp / "semantic_ids.npy", np.asarray(codes, dtype=np.int32))
        np.save(tmp / "codebooks.npy", np.asarray(codebooks, dtype=np.float32))
        ItemTrie.build(codes, id_format).save(tmp / "trie.npz")
        pop = np.zeros(len(items), np.float32) if popularity is None else np.asarray(popularity, np.float32)
        np.save(tmp / "popularity.npy", pop)
        if prior is not None:
            prior.save(tmp / PRIOR_FILE)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if model is not None:
            model.save_pretrained(str(tmp / MODEL_DIR), safe_serialization=True)
        files = {name: _sha256(tmp / name) for name in _content_files(tmp)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "bundle_version": version or new_bundle_version(_digest(files)),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "id_format": id_format.to_dict(),
            "prompt_format": PROMPT_SETTINGS,
            "has_model": model is not None,
            "prior": None if prior is None else prior.settings.to_dict(),
            "settings": settings or {},
            "stats": stats or {},
            "files": files,
            "content_sha256": _digest(files),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ load


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')!r} is not supported "
                          f"(this build reads format {FORMAT_VERSION})")
    return manifest


def verify_bundle(path: str | Path) -> list[str]:
    """Every problem found (missing, unexpected or altered files); an empty list means intact."""
    path = Path(path)
    manifest = read_manifest(path)
    expected: dict[str, str] = manifest.get("files", {})
    present = set(_content_files(path))
    problems = [f"missing file {name}" for name in sorted(set(expected) - present)]
    problems += [f"unexpected file {name} (not in the manifest)" for name in sorted(present - set(expected))]
    for name in sorted(set(expected) & present):
        if _sha256(path / name) != expected[name]:
            problems.append(f"hash mismatch for {name}: the file was changed after the bundle was built")
    return problems


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    path = Path(path).resolve()
    manifest = read_manifest(path)
    if verify:
        problems = verify_bundle(path)
        if problems:
            raise BundleError(f"bundle {path} failed verification:\n  " + "\n  ".join(problems))
    id_format = IdFormat.from_dict(manifest["id_format"])
    items = read_catalog(path / "items.jsonl")
    codes = np.load(path / "semantic_ids.npy")
    trie = ItemTrie.load(path / "trie.npz", id_format)
    if trie.num_items != len(items) or len(codes) != len(items):
        raise BundleError(f"bundle {path} is inconsistent: {len(items)} items, {len(codes)} IDs, "
                          f"{trie.num_items} trie leaves")
    prior = None
    if manifest.get("prior") is not None:
        if not (path / PRIOR_FILE).is_file():
            raise BundleError(f"bundle {path}: the manifest names a prior but {PRIOR_FILE} is missing")
        prior = TransitionPrior.load(path / PRIOR_FILE, PriorSettings.from_dict(manifest["prior"]))
        if prior.num_items != len(items):
            raise BundleError(f"bundle {path} is inconsistent: the prior covers {prior.num_items} items, "
                              f"the catalog {len(items)}")
    return Bundle(path=path, manifest=manifest, items=items, codes=codes,
                  codebooks=np.load(path / "codebooks.npy"), trie=trie,
                  popularity=np.load(path / "popularity.npy"), prior=prior)


def inspect_bundle(bundle: Bundle) -> dict[str, Any]:
    """Summary printed by `gream bundle inspect --json`."""
    return {
        "path": str(bundle.path),
        "bundle_version": bundle.version,
        "created_at": bundle.manifest["created_at"],
        "format_version": bundle.manifest["format_version"],
        **id_stats(bundle.codes, bundle.id_format),
        "trie_leaves": int((bundle.trie.node_item >= 0).sum()),
        "trie_nodes": bundle.trie.num_nodes,
        # ID quality: lift of sharing a brand / top category among items that share the first code.
        "first_code_lift": {
            "brand": prefix_coherence([it.brand for it in bundle.items], bundle.codes[:, 0]),
            "top_category": prefix_coherence([it.categories.split(" > ")[0] for it in bundle.items],
                                             bundle.codes[:, 0]),
        },
        "has_model": bundle.has_model,
        "prior": bundle.manifest.get("prior"),
        "embedding": bundle.manifest.get("settings", {}).get("embedding"),
        "prompt_format": bundle.manifest["prompt_format"]["version"],
        "training": bundle.manifest.get("stats", {}).get("training"),
    }
