"""The flat-array trie against a brute-force reference: reachability, allowed next codes, filters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store.tokens import IdFormat
from model_store.trie import ROOT, ItemTrie

# ------------------------------------------------------------------------------------------ reference


def brute_next(items: list[tuple[int, ...]], ok: set[int]) -> dict[tuple[int, ...], list[int]]:
    """prefix -> sorted codes that follow it in at least one permitted item (indices in `ok`)."""
    nxt: dict[tuple[int, ...], set[int]] = {}
    for i in ok:
        for k in range(len(items[i])):
            nxt.setdefault(items[i][:k], set()).add(items[i][k])
    return {p: sorted(c) for p, c in nxt.items()}


def walk(trie: ItemTrie, trie_filter=None) -> tuple[dict[tuple[int, ...], int], list[int]]:
    """Every full path reachable from the root (codes -> item at the leaf), and any dead-end nodes.

    Uses batched `children` calls, one per depth, the way the beam search does.
    """
    fmt = trie.id_format
    nodes = np.array([ROOT])
    paths: list[tuple[int, ...]] = [()]
    dead: list[int] = []
    for level in range(trie.depth):
        kids = trie.children(nodes, trie_filter)
        has_child = np.bincount(kids.row, minlength=len(nodes)) > 0
        dead += [int(n) for n in nodes[~has_child]]
        paths = [paths[r] + (int(c) - fmt.level_offset(level),) for r, c in zip(kids.row, kids.code)]
        nodes = kids.node
    return {p: int(trie.node_item[n]) for p, n in zip(paths, nodes)}, dead


def check_against_reference(items: list[tuple[int, ...]], fmt: IdFormat, exclude: set[int] = frozenset(),
                            allow: set[int] | None = None) -> None:
    trie = ItemTrie.build(np.array(items), fmt)
    f = trie.make_filter(exclude=sorted(exclude), allow=None if allow is None else sorted(allow))
    ok = (set(range(len(items))) if allow is None else set(allow)) - set(exclude)

    reached, dead = walk(trie, f)
    # Exactly the permitted items are reachable, each at its own ID, and no beam can dead-end.
    assert reached == {items[i]: i for i in ok}
    assert dead == ([] if ok else [ROOT])
    # allowed_next equals brute force for every prefix of every item (and of a few non-items).
    prefixes = {it[:k] for it in items for k in range(fmt.depth + 1)}
    prefixes |= {it[:k - 1] + ((it[k - 1] + 1) % fmt.level_size(k - 1),) for it in items
                 for k in range(1, fmt.depth + 1)}
    want, want_all = brute_next(items, ok), brute_next(items, set(range(len(items))))
    for prefix in prefixes:
        assert trie.allowed_next(prefix, f) == want.get(prefix, []), prefix
        assert trie.allowed_next(prefix) == want_all.get(prefix, []), prefix


# ------------------------------------------------------------------------------------------ hypothesis


@st.composite
def id_sets(draw):
    levels = draw(st.integers(1, 3))
    cb = draw(st.integers(2, 5))
    dd = draw(st.integers(1, 3))
    fmt = IdFormat(levels=levels, codebook_size=cb, dedup_size=dd)
    code = st.tuples(*[st.integers(0, cb - 1)] * levels, st.integers(0, dd - 1))
    items = draw(st.lists(code, min_size=1, max_size=40, unique=True))
    idx = st.integers(0, len(items) - 1)
    exclude = draw(st.sets(idx, max_size=len(items)))
    allow = draw(st.none() | st.sets(idx, max_size=len(items)))
    return fmt, items, exclude, allow


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(id_sets())
def test_trie_matches_brute_force(case) -> None:
    fmt, items, exclude, allow = case
    check_against_reference(items, fmt)  # no filter
    check_against_reference(items, fmt, exclude=exclude)  # exclusions
    if allow is not None:
        check_against_reference(items, fmt, allow=allow)  # allow-list
        check_against_reference(items, fmt, exclude=exclude, allow=allow)  # both


# ------------------------------------------------------------------------------------------ larger sets


@pytest.fixture(scope="module")
def big():
    """3,000 random IDs over 3 x 6 codes + 8 dedup codes: dense enough for many shared prefixes."""
    rng = np.random.default_rng(0)
    fmt = IdFormat(levels=3, codebook_size=6, dedup_size=8)
    all_ids = np.stack(np.meshgrid(*[np.arange(6)] * 3, np.arange(8), indexing="ij"), -1).reshape(-1, 4)
    codes = all_ids[rng.choice(len(all_ids), 1200, replace=False)]
    codes = codes[rng.permutation(len(codes))]  # not sorted: item order must not matter
    return fmt, [tuple(int(c) for c in row) for row in codes]


def test_big_random_set_against_brute_force(big) -> None:
    fmt, items = big
    rng = np.random.default_rng(1)
    check_against_reference(items, fmt)
    check_against_reference(items, fmt, exclude=set(rng.choice(len(items), 400, replace=False).tolist()))


def test_excluding_a_whole_subtree_prunes_it(big) -> None:
    fmt, items = big
    trie = ItemTrie.build(np.array(items), fmt)
    first = items[0][0]
    under = {i for i, it in enumerate(items) if it[0] == first}
    f = trie.make_filter(exclude=under)
    assert first not in trie.allowed_next((), f)  # pruned at the root, not discovered at the leaf
    assert first in trie.allowed_next(())
    reached, dead = walk(trie, f)
    assert set(reached.values()) == set(range(len(items))) - under
    assert dead == []
    # The subtree's top node itself is blocked (so beams never enter it).
    assert trie.node_for_prefix((first,)) in f.nodes


def test_excluding_one_item_keeps_its_siblings(big) -> None:
    fmt, items = big
    trie = ItemTrie.build(np.array(items), fmt)
    victim = next(i for i, it in enumerate(items)
                  if len(trie.allowed_next(it[:-1])) > 1)  # an item with a sibling at the last level
    f = trie.make_filter(exclude=[victim])
    after = trie.allowed_next(items[victim][:-1], f)
    assert items[victim][-1] not in after and len(after) == len(trie.allowed_next(items[victim][:-1])) - 1
    assert trie.item_at(items[victim]) == victim  # lookups without the filter are unaffected


def test_batched_children_equal_single_node_queries(big) -> None:
    fmt, items = big
    trie = ItemTrie.build(np.array(items), fmt)
    rng = np.random.default_rng(2)
    f = trie.make_filter(exclude=rng.choice(len(items), 300, replace=False))
    nodes = rng.integers(0, trie.num_nodes, 64)
    nodes[:3] = [ROOT, ROOT, trie.num_nodes - 1]  # duplicates and a leaf
    for flt in (None, f):
        batch = trie.children(nodes, flt)
        assert np.all(np.diff(batch.row) >= 0)
        for r, node in enumerate(nodes):
            one = trie.children(np.array([node]), flt)
            sel = batch.row == r
            np.testing.assert_array_equal(batch.node[sel], one.node)
            np.testing.assert_array_equal(batch.code[sel], one.code)


# ------------------------------------------------------------------------------------------ details


def test_structure_and_lookups() -> None:
    fmt = IdFormat(levels=2, codebook_size=4, dedup_size=2)
    items = [(3, 1, 0), (0, 2, 0), (0, 2, 1), (0, 3, 0)]
    trie = ItemTrie.build(np.array(items), fmt)
    assert trie.num_items == 4 and trie.depth == 3
    assert trie.num_nodes == 1 + 2 + 3 + 4
    assert trie.allowed_next(()) == [0, 3]
    assert trie.allowed_next((0,)) == [2, 3]
    assert trie.allowed_next((0, 2)) == [0, 1]
    assert trie.allowed_next((0, 2, 1)) == []  # a full ID has no continuation
    assert trie.allowed_next((1,)) == [] and trie.allowed_next((0, 9)) == []
    for i, it in enumerate(items):
        assert trie.item_at(it) == i
        leaf = trie.node_for_prefix(it)
        assert trie.node_item[leaf] == i
        assert trie.item_path[i, -1] == leaf
        assert trie.items_below[leaf] == 1
    assert trie.item_at((0, 2)) is None and trie.item_at((2, 2, 0)) is None
    assert trie.items_below[ROOT] == 4 and trie.items_below[trie.node_for_prefix((0,))] == 3
    assert (trie.node_item >= 0).sum() == 4
    # Codes returned by children() are flat codes (per-level offset applied).
    kids = trie.children(np.array([trie.node_for_prefix((0,))]))
    assert kids.code.tolist() == [fmt.flat_code(1, 2), fmt.flat_code(1, 3)]
    assert trie.nbytes > 0


def test_filter_edge_cases() -> None:
    fmt = IdFormat(levels=1, codebook_size=3, dedup_size=2)
    trie = ItemTrie.build(np.array([(0, 0), (0, 1), (2, 0)]), fmt)
    assert trie.make_filter() is None and trie.make_filter(exclude=[]) is None
    everything = trie.make_filter(exclude=[0, 1, 2, 2])
    assert trie.allowed_next((), everything) == []
    assert trie.allowed_next((), trie.make_filter(allow=[])) == []
    assert trie.allowed_next((), trie.make_filter(allow=[1])) == [0]
    assert trie.allowed_next((0,), trie.make_filter(allow=[1])) == [1]
    assert trie.allowed_next((), trie.make_filter(exclude=[2], allow=[1, 2])) == [0]
    assert trie.allowed_next((), trie.make_filter(exclude=np.array([0, 1]))) == [2]
    assert trie.allowed_next((), trie.make_filter(exclude=iter([0]))) == [0, 2]


@pytest.mark.parametrize("codes,match", [
    ([(0, 0), (0, 0)], "not unique"),
    ([(0, 0), (3, 0)], "out of range"),
    ([(0, 2)], "out of range"),
    ([(0, -1)], "out of range"),
    ([(0, 0, 0)], "levels"),
])
def test_build_rejects_bad_codes(codes, match) -> None:
    with pytest.raises(ValueError, match=match):
        ItemTrie.build(np.array(codes), IdFormat(levels=1, codebook_size=3, dedup_size=2))


def test_build_rejects_empty() -> None:
    with pytest.raises(ValueError, match="zero items"):
        ItemTrie.build(np.zeros((0, 2), dtype=np.int64), IdFormat(levels=1, codebook_size=3, dedup_size=2))


def test_save_load_round_trip(tmp_path, big) -> None:
    fmt, items = big
    trie = ItemTrie.build(np.array(items), fmt)
    trie.save(tmp_path / "trie.npz")
    loaded = ItemTrie.load(tmp_path / "trie.npz", fmt)
    for name in ("child_start", "node_code", "node_item", "items_below", "item_path"):
        a, b = getattr(trie, name), getattr(loaded, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    f = loaded.make_filter(exclude=range(0, len(items), 3))
    reached, dead = walk(loaded, f)
    assert set(reached.values()) == {i for i in range(len(items)) if i % 3} and dead == []


def test_item_order_does_not_change_paths() -> None:
    rng = np.random.default_rng(5)
    fmt = IdFormat(levels=2, codebook_size=8, dedup_size=4)
    flat = rng.choice(8 * 8 * 4, 100, replace=False)
    codes = np.stack([flat // 32, (flat // 4) % 8, flat % 4], 1)
    a = ItemTrie.build(codes, fmt)
    perm = rng.permutation(100)
    b = ItemTrie.build(codes[perm], fmt)
    np.testing.assert_array_equal(a.child_start, b.child_start)
    np.testing.assert_array_equal(a.node_code, b.node_code)
    np.testing.assert_array_equal(a.item_path[perm], b.item_path)
