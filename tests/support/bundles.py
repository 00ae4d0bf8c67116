"""A complete tiny bundle built in seconds, for tests and smoke runs: random vectors instead of text
embeddings and, optionally, a random-weight 2-layer Llama. Not a recommender: a fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_tiny_bundle(out: Path, n_items: int = 300, seed: int = 0, with_model: bool = True,
                     levels: int = 3, codebook_size: int = 8, dedup_size: int = 16, with_prior: bool = True) -> Path:
    """A complete bundle (items with titles and brands, IDs, trie, tokenizer, optional model). Its
    collaborative prior is counted from sequences where item i is always followed by item i + 1 (mod n),
    so a test can tell whether decoding fused it."""
    from model_store.builder import BuildConfig, build_bundle, make_tokenizer
    from model_store.catalog import Item
    from model_store.prior import TransitionPrior
    from model_store.semantic_ids import QuantizerConfig

    rng = np.random.default_rng(seed)
    brands = ["Acme", "Globex", "Initech", "Umbrella", "Stark"]
    kinds = ["pipette", "beaker", "glove", "scale", "funnel", "clamp", "tape", "sensor"]
    items = [Item(item_id=f"sku-{i}", title=f"{brands[i % 5]} {kinds[i % 8]} model {i}",
                  brand=brands[i % 5], categories=f"Lab > {kinds[i % 8]}", description=f"A {kinds[i % 8]}.")
             for i in range(n_items)]
    cfg = BuildConfig(quantizer=QuantizerConfig(levels=levels, codebook_size=codebook_size,
                                                dedup_size=dedup_size, seed=seed))
    vectors = rng.normal(size=(n_items, 16)).astype(np.float32)
    tokenizer = make_tokenizer(items, cfg)
    model = None
    if with_model:
        from training.backbone import SCRATCH_PRESETS, build_scratch_model

        model = build_scratch_model(SCRATCH_PRESETS["demo"], tokenizer)
    popularity = rng.integers(0, 50, n_items).astype(np.float32)
    prior = None
    if with_prior:
        prior = TransitionPrior.fit(([s % n_items, (s + 1) % n_items, (s + 2) % n_items] for s in range(n_items)),
                                    n_items)
    path, _ = build_bundle(items, out, cfg, vectors=vectors, tokenizer=tokenizer, model=model,
                           popularity=popularity, prior=prior, overwrite=True, log=lambda *a: None)
    return path
