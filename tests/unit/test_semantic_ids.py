"""Semantic IDs: residual k-means codes, de-duplication, determinism, fixed-codebook assignment."""

from __future__ import annotations

import numpy as np
import pytest

from model_store.semantic_ids import (
    QuantizerConfig,
    add_dedup_level,
    assign_codes,
    assign_new_items,
    build_semantic_ids,
    fit_codebooks,
    id_stats,
)
from model_store.tokens import IdFormat


def clustered(n: int, dim: int = 16, clusters: int = 6, seed: int = 0, sizes: list[float] | None = None
              ) -> np.ndarray:
    """Gaussian blobs, optionally of very unequal sizes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(clusters, dim))
    p = None if sizes is None else np.asarray(sizes) / np.sum(sizes)
    which = rng.choice(clusters, size=n, p=p)
    return (centers[which] + rng.normal(scale=0.5, size=(n, dim))).astype(np.float32)


# Plain k-means here: the assertions below are about nearest-centre coding (balanced has its own test).
CFG = QuantizerConfig(levels=3, codebook_size=8, dedup_size=32, seed=0, kmeans_n_init=1, kmeans_max_iter=50,
                      balanced=False)


def unique_rows(codes: np.ndarray) -> int:
    return len(np.unique(codes, axis=0))


def test_ids_unique_after_dedup_even_with_duplicate_vectors() -> None:
    x = clustered(300)
    x[100:110] = x[0]  # eleven identical items must still get eleven distinct IDs
    sem = build_semantic_ids(x, CFG)
    assert sem.codes.shape == (300, 4) and sem.codes.dtype == np.int32
    assert unique_rows(sem.codes) == 300
    assert sem.stats["unique_ids"] == 300 and sem.stats["items"] == 300
    assert sem.stats["max_dedup_depth"] >= 11
    dup_codes = sem.codes[[0, *range(100, 110)]]
    assert len({tuple(r[:-1]) for r in dup_codes}) == 1  # same base code ...
    assert sorted(dup_codes[:, -1]) == list(range(11))  # ... told apart by 0..10
    assert sem.codebooks.shape == (3, 8, 16)
    for lv in range(3):
        assert sem.codes[:, lv].max() < 8


def test_codes_deterministic_for_a_seed() -> None:
    x = clustered(250, seed=3)
    a = build_semantic_ids(x, CFG)
    b = build_semantic_ids(x.copy(), CFG)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codebooks, b.codebooks)
    assert a.stats == b.stats


def test_different_seeds_may_differ() -> None:
    x = np.random.default_rng(0).normal(size=(250, 16)).astype(np.float32)  # no clear clusters
    base = build_semantic_ids(x, CFG).codes
    others = [build_semantic_ids(x, QuantizerConfig(**{**CFG.__dict__, "seed": s})).codes for s in (1, 2, 3)]
    assert any(not np.array_equal(base, o) for o in others)
    for o in others:  # whatever the seed, IDs are unique
        assert unique_rows(o) == 250


def test_add_dedup_level_in_input_order() -> None:
    base = np.array([[0, 1], [0, 1], [2, 2], [0, 1], [2, 2]])
    out = add_dedup_level(base, dedup_size=4)
    np.testing.assert_array_equal(out[:, :2], base)
    assert out[:, 2].tolist() == [0, 1, 0, 2, 1]


def test_add_dedup_level_with_existing_ids_takes_smallest_free_code() -> None:
    existing = np.array([[0, 1, 0], [0, 1, 2], [5, 5, 0]])
    base = np.array([[0, 1], [0, 1], [5, 5], [7, 7]])
    out = add_dedup_level(base, dedup_size=4, existing=existing)
    assert out[:, 2].tolist() == [1, 3, 1, 0]
    full = np.concatenate([existing, out])
    assert unique_rows(full) == len(full)


def test_dedup_overflow_error_message() -> None:
    base = np.array([[3, 4]] * 3 + [[1, 1]])
    with pytest.raises(ValueError) as info:
        add_dedup_level(base, dedup_size=2)
    msg = str(info.value)
    assert "3 items share the semantic ID prefix (3, 4)" in msg
    assert "only 2 codes" in msg and "dedup_size" in msg
    with pytest.raises(ValueError, match="2 items share"):
        add_dedup_level(np.array([[3, 4]]), dedup_size=1, existing=np.array([[3, 4, 0]]))


def test_build_sizes_the_dedup_level_to_a_crowded_catalog() -> None:
    x = np.repeat(clustered(3), 5, axis=0)  # 5 copies of each of 3 points: 5 items share a base ID
    sem = build_semantic_ids(x, QuantizerConfig(levels=2, codebook_size=4, dedup_size=4, kmeans_n_init=1,
                                                balanced=False))
    assert sem.id_format is not None and sem.id_format.dedup_size == 16  # room for as many again
    assert unique_rows(sem.codes) == len(x) and sem.codes[:, -1].max() < 16
    assert sem.stats["dedup_size"] == 16


def test_a_catalog_that_fits_keeps_the_requested_dedup_size() -> None:
    sem = build_semantic_ids(clustered(3), QuantizerConfig(levels=2, codebook_size=4, dedup_size=4,
                                                           kmeans_n_init=1, balanced=False))
    assert sem.id_format is not None and sem.id_format.dedup_size == 4


def test_assign_codes_with_fixed_codebooks() -> None:
    nan = np.nan
    codebooks = np.array([
        [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [nan, nan]],  # last row unused
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]],
    ], dtype=np.float32)
    x = np.array([[10.9, 0.1], [0.2, 11.1], [-1.0, -0.8], [9.0, -0.2], [100.0, 90.0]], dtype=np.float32)
    codes = assign_codes(x, codebooks)
    assert codes[:4].tolist() == [[1, 1], [2, 2], [0, 3], [1, 3]]
    assert codes[4, 0] == 1  # far away, still a used row: the NaN row is never chosen


def test_assign_codes_reproduces_fitted_codes() -> None:
    x = clustered(200, seed=5)
    codebooks, base = fit_codebooks(x, CFG)
    np.testing.assert_array_equal(assign_codes(x, codebooks), base)


def test_assign_new_items_keeps_existing_ids_unique() -> None:
    x = clustered(200, seed=7)
    sem = build_semantic_ids(x, CFG)
    new = np.concatenate([x[:5], clustered(20, seed=8)])  # 5 copies of existing items, 20 new
    new_codes = assign_new_items(new, sem.codebooks, sem.codes, CFG.dedup_size)
    assert new_codes.shape == (25, 4)
    np.testing.assert_array_equal(new_codes[:5, :-1], sem.codes[:5, :-1])  # same base codes ...
    full = np.concatenate([sem.codes, new_codes])
    assert unique_rows(full) == len(full)  # ... but fresh dedup codes


def test_balanced_gives_flatter_usage() -> None:
    x = clustered(400, clusters=8, sizes=[50, 20, 10, 5, 2, 1, 1, 1], seed=11)
    cfg = QuantizerConfig(levels=2, codebook_size=8, dedup_size=64, seed=0, kmeans_n_init=1, balanced=False)
    plain = build_semantic_ids(x, cfg)
    bal = build_semantic_ids(x, QuantizerConfig(**{**cfg.__dict__, "balanced": True}))
    for sem in (plain, bal):
        assert unique_rows(sem.codes) == 400
    plain_counts = np.bincount(plain.codes[:, 0], minlength=8)
    bal_counts = np.bincount(bal.codes[:, 0], minlength=8)
    assert bal_counts.max() <= int(np.ceil(400 / 8))
    assert bal_counts.std() < plain_counts.std()
    assert bal.stats["max_dedup_depth"] <= plain.stats["max_dedup_depth"]


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_small_catalogs_fewer_items_than_codebook(n: int) -> None:
    x = clustered(n, seed=n)
    cfg = QuantizerConfig(levels=3, codebook_size=256, dedup_size=256, seed=0, kmeans_n_init=1)
    sem = build_semantic_ids(x, cfg)
    assert sem.codes.shape == (n, 4)
    assert unique_rows(sem.codes) == n
    assert sem.codebooks.shape == (3, 256, 16)
    assert all(0 < u <= n / 256 for u in sem.stats["codebook_usage"])
    # New items can still be coded against the partly empty (NaN) codebooks.
    extra = assign_new_items(clustered(4, seed=99), sem.codebooks, sem.codes, 256)
    assert unique_rows(np.concatenate([sem.codes, extra])) == n + 4


def test_id_stats_on_known_codes() -> None:
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    stats = id_stats(codes, IdFormat(levels=2, codebook_size=4, dedup_size=4))
    assert stats["items"] == 6 and stats["unique_ids"] == 6
    assert stats["collisions_before_dedup"] == 3  # (0,0) holds 3 items, (1,1) holds 2: 2 + 1 extra
    assert stats["collision_rate_before_dedup"] == pytest.approx(0.5)
    assert stats["max_dedup_depth"] == 3
    assert stats["codebook_usage"] == [0.5, 0.5]
    assert (stats["levels"], stats["codebook_size"], stats["dedup_size"]) == (2, 4, 4)
