"""Catalog -> semantic IDs -> trie -> bundle, and adding items to an existing bundle."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model_store.bundle import Bundle, BundleError, load_bundle, save_bundle
from model_store.catalog import TEXT_FIELDS, Item, fused_text, read_catalog
from model_store.prior import TransitionPrior
from model_store.semantic_ids import (
    DEFAULT_EMBEDDER,
    QuantizerConfig,
    assign_new_items,
    build_semantic_ids,
    embed_texts,
    id_stats,
)
from model_store.tokenizer import load_pretrained_tokenizer, train_catalog_tokenizer


@dataclass
class BuildConfig:
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    text_fields: tuple[str, ...] = TEXT_FIELDS
    embedder: str = DEFAULT_EMBEDDER
    tokenizer: str | None = None  # local HF tokenizer folder to extend; None trains one from the catalog
    tokenizer_vocab_size: int = 4000

    def settings(self, dim: int) -> dict[str, Any]:
        return {"quantizer": asdict(self.quantizer),
                "embedding": {"model": self.embedder, "fields": list(self.text_fields), "dim": dim},
                "tokenizer": {"base": self.tokenizer or "bpe-from-catalog",
                              "vocab_size": self.tokenizer_vocab_size}}


def read_interaction_counts(path: str | Path, index_of: dict[str, int]) -> np.ndarray:
    """Per-item interaction counts from JSON Lines with `item_ids` (sequences) or `history`+`target`."""
    counts = np.zeros(len(index_of), dtype=np.float32)
    with Path(path).open() as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            ids = row.get("item_ids") or [*row.get("history", []), *([row["target"]] if "target" in row else [])]
            for item_id in ids:
                idx = index_of.get(str(item_id))
                if idx is not None:
                    counts[idx] += 1
    return counts


def make_tokenizer(items: Sequence[Item], cfg: BuildConfig) -> Any:
    if cfg.tokenizer:
        return load_pretrained_tokenizer(cfg.tokenizer, cfg.quantizer.id_format)
    texts = [t for it in items for t in (it.title, it.brand, it.categories) if t]
    return train_catalog_tokenizer(texts, cfg.quantizer.id_format, vocab_size=cfg.tokenizer_vocab_size)


def build_bundle(items: Sequence[Item] | str | Path, out: str | Path, cfg: BuildConfig | None = None, *,
                 interactions: str | Path | None = None, popularity: np.ndarray | None = None,
                 model: Any | None = None, tokenizer: Any | None = None, vectors: np.ndarray | None = None,
                 prior: TransitionPrior | None = None, overwrite: bool = False, log: Any = print
                 ) -> tuple[Path, dict[str, Any]]:
    """Build a bundle; returns its path and build statistics (timings included)."""
    cfg = cfg or BuildConfig()
    t0 = time.perf_counter()
    items = read_catalog(items) if isinstance(items, (str, Path)) else list(items)
    timings: dict[str, float] = {}
    if vectors is None:
        log(f"embedding {len(items)} items with {cfg.embedder} ({', '.join(cfg.text_fields)})")
        t = time.perf_counter()
        vectors = embed_texts([fused_text(it, cfg.text_fields) for it in items], cfg.embedder)
        timings["embed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"residual k-means: {cfg.quantizer.levels} levels x {cfg.quantizer.codebook_size} codes")
    sem = build_semantic_ids(vectors, cfg.quantizer)
    timings["quantize_s"] = time.perf_counter() - t
    assert sem.id_format is not None
    if sem.id_format.dedup_size != cfg.quantizer.dedup_size:
        if tokenizer is not None:
            raise BundleError(f"the catalog needs a de-duplication level of {sem.id_format.dedup_size} codes, "
                              f"more than the given tokenizer's {cfg.quantizer.dedup_size}")
        log(f"de-duplication level sized to {sem.id_format.dedup_size} codes (up to "
            f"{sem.stats['max_dedup_depth']} items share a base ID; {cfg.quantizer.dedup_size} were asked for)")
        cfg = replace(cfg, quantizer=replace(cfg.quantizer, dedup_size=sem.id_format.dedup_size))
    if popularity is None and interactions is not None:
        popularity = read_interaction_counts(interactions, {it.item_id: i for i, it in enumerate(items)})
    t = time.perf_counter()
    tokenizer = tokenizer or make_tokenizer(items, cfg)
    timings["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = dict(sem.stats)
    path = save_bundle(out, items=list(items), codes=sem.codes, codebooks=sem.codebooks,
                       id_format=cfg.quantizer.id_format, tokenizer=tokenizer, model=model,
                       popularity=popularity, settings=cfg.settings(vectors.shape[1]), stats=stats,
                       prior=prior, overwrite=overwrite)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return path, {**stats, "timings": timings}


def add_items(bundle_dir: str | Path, new_items: Iterable[Item] | str | Path, out: str | Path,
              overwrite: bool = False, log: Any = print,
              vectors: np.ndarray | None = None) -> tuple[Path, dict[str, Any]]:
    """A new bundle version with items appended, coded by the existing codebooks.

    Existing items keep their IDs; the model and tokenizer are carried over unchanged (every ID token
    already exists, since the tokenizer holds the full code vocabulary). `vectors` are the new items'
    embeddings when the catalog brings its own (as the bundle was built); by default their text is
    embedded with the bundle's embedder.
    """
    bundle: Bundle = load_bundle(bundle_dir)
    new = read_catalog(new_items) if isinstance(new_items, (str, Path)) else list(new_items)
    clash = [it.item_id for it in new if it.item_id in bundle.index_of]
    if clash:
        raise BundleError(f"{len(clash)} new item id(s) already exist in the bundle, e.g. {clash[:5]}")
    settings = bundle.manifest["settings"]
    fields = tuple(settings["embedding"]["fields"])
    if vectors is None:
        log(f"embedding {len(new)} new items")
        vectors = embed_texts([fused_text(it, fields) for it in new], settings["embedding"]["model"])
    elif len(vectors) != len(new):
        raise BundleError(f"{len(vectors)} vectors for {len(new)} new items")
    fmt = bundle.id_format
    new_codes = assign_new_items(vectors, bundle.codebooks, bundle.codes, fmt.dedup_size)
    codes = np.concatenate([bundle.codes, new_codes])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    model = None
    if bundle.has_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(bundle.model_path), local_files_only=True)
    popularity = np.concatenate([bundle.popularity, np.zeros(len(new), np.float32)])
    stats = {**bundle.manifest.get("stats", {}), **id_stats(codes, fmt), "added_items": len(new),
             "parent_bundle": bundle.version}
    path = save_bundle(out, items=bundle.items + new, codes=codes, codebooks=bundle.codebooks, id_format=fmt,
                       tokenizer=tokenizer, model=model, popularity=popularity, settings=settings,
                       stats=stats, prior=None if bundle.prior is None else bundle.prior.extended(len(codes)),
                       overwrite=overwrite)
    return path, stats
