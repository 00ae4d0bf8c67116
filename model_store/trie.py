"""Prefix trie over the catalog's semantic IDs, stored as flat arrays.

Nodes are numbered breadth-first over the lexicographically sorted IDs, so the children of a node are
a contiguous run of node ids: `child_start[n] .. child_start[n + 1]`. Looking up the allowed next
tokens for a batch of beams is a handful of vectorised array operations whose cost depends on the
number of children returned, never on the catalog size, and no Python dict is walked per token.

Per-request exclusions and allow-lists (`TrieFilter`) mark whole subtrees as blocked without
rebuilding anything: a node is blocked once every item below it is excluded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.tokens import IdFormat

ROOT = 0


@dataclass(frozen=True)
class TrieFilter:
    """Per-request restriction: either a sorted array of blocked nodes or of the only allowed nodes."""

    nodes: np.ndarray
    allow_only: bool

    def keep(self, child_nodes: np.ndarray) -> np.ndarray:
        # Binary search in the sorted node list: O(children x log(filter size)). np.isin may pick its
        # "table" method, which allocates a table spanning the node-id range: its cost would grow
        # with the catalog (about 0.25 ms per call at 100k items) rather than with the filter.
        if len(self.nodes) == 0:
            hit = np.zeros(len(child_nodes), dtype=bool)
        else:
            pos = np.searchsorted(self.nodes, child_nodes)
            np.minimum(pos, len(self.nodes) - 1, out=pos)
            hit = self.nodes[pos] == child_nodes
        return hit if self.allow_only else ~hit


@dataclass(frozen=True)
class Children:
    """Children of a batch of nodes, flattened: one row per (parent, child) pair."""

    row: np.ndarray  # index of the parent in the queried batch
    code: np.ndarray  # flat code (IdFormat.flat_code) of the child token
    node: np.ndarray  # child node id


class ItemTrie:
    """Trie of fixed-length semantic IDs; item i is the leaf reached by codes[i]."""

    def __init__(self, id_format: IdFormat, child_start: np.ndarray, node_code: np.ndarray,
                 node_item: np.ndarray, items_below: np.ndarray, item_path: np.ndarray):
        self.id_format = id_format
        self.child_start = child_start  # int64 [num_nodes + 1]
        self.node_code = node_code  # int32 [num_nodes]; flat code of the edge into the node, -1 at root
        self.node_item = node_item  # int32 [num_nodes]; item index at leaves, -1 elsewhere
        self.items_below = items_below  # int32 [num_nodes]
        self.item_path = item_path  # int32 [num_items, depth]; node ids from depth 1 to the leaf

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, codes: np.ndarray, id_format: IdFormat) -> ItemTrie:
        """Build from an [num_items, depth] array of per-level codes (all rows distinct)."""
        codes = np.asarray(codes, dtype=np.int64)
        n, depth = codes.shape
        if depth != id_format.depth:
            raise ValueError(f"codes have {depth} levels, the ID format has {id_format.depth}")
        if n == 0:
            raise ValueError("cannot build a trie of zero items")
        for level in range(depth):
            col = codes[:, level]
            if col.min() < 0 or col.max() >= id_format.level_size(level):
                raise ValueError(f"level {level} codes out of range 0..{id_format.level_size(level) - 1}")
        order = np.lexsort(codes.T[::-1])
        sorted_codes = codes[order]
        if n > 1 and not np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1).all():
            raise ValueError("semantic IDs are not unique; de-duplicate before building the trie")

        item_path = np.empty((n, depth), dtype=np.int64)
        parent_of_row = np.zeros(n, dtype=np.int64)  # node id at the previous depth (root first)
        child_start_parts = []
        node_code_parts = [np.array([-1], dtype=np.int64)]
        next_id = 1
        for level in range(depth):
            is_new = np.ones(n, dtype=bool)
            if n > 1:
                is_new[1:] = np.any(sorted_codes[1:, : level + 1] != sorted_codes[:-1, : level + 1], axis=1)
            row_node = np.cumsum(is_new) - 1 + next_id
            new_parents = parent_of_row[is_new]
            # Parents of this level's nodes are the previous level's nodes, in id order, each
            # owning a contiguous run of children: record where each parent's run starts.
            level_first = next_id
            prev_first = int(parent_of_row.min())
            prev_count = int(parent_of_row.max()) - prev_first + 1
            counts = np.bincount(new_parents - prev_first, minlength=prev_count)
            child_start_parts.append(level_first + np.concatenate([[0], np.cumsum(counts)[:-1]]))
            node_code_parts.append(id_format.level_offset(level) + sorted_codes[is_new, level])
            item_path[:, level] = row_node
            parent_of_row = row_node
            next_id += int(is_new.sum())
        num_nodes = next_id
        # Leaves have no children: their runs start (and end) at num_nodes.
        child_start = np.concatenate(child_start_parts + [np.full(n + 1, num_nodes)]).astype(np.int64)
        node_code = np.concatenate(node_code_parts).astype(np.int32)

        inv = np.empty(n, dtype=np.int64)
        inv[order] = np.arange(n)
        item_path_by_item = item_path[inv].astype(np.int32)
        node_item = np.full(num_nodes, -1, dtype=np.int32)
        node_item[item_path_by_item[:, -1]] = np.arange(n, dtype=np.int32)
        items_below = np.bincount(item_path_by_item.ravel(), minlength=num_nodes).astype(np.int32)
        items_below[ROOT] = n
        return cls(id_format, child_start, node_code, node_item, items_below, item_path_by_item)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        np.savez(path, child_start=self.child_start, node_code=self.node_code, node_item=self.node_item,
                 items_below=self.items_below, item_path=self.item_path)

    @classmethod
    def load(cls, path: str | Path, id_format: IdFormat) -> ItemTrie:
        with np.load(path) as data:
            return cls(id_format, data["child_start"], data["node_code"], data["node_item"],
                       data["items_below"], data["item_path"])

    # ---------------------------------------------------------------- queries
    @property
    def num_nodes(self) -> int:
        return len(self.node_code)

    @property
    def num_items(self) -> int:
        return len(self.item_path)

    @property
    def depth(self) -> int:
        return self.item_path.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.child_start, self.node_code, self.node_item, self.items_below,
                                      self.item_path))

    def children(self, nodes: np.ndarray, trie_filter: TrieFilter | None = None) -> Children:
        """All (parent row, child code, child node) triples for a batch of nodes, in one pass."""
        nodes = np.asarray(nodes, dtype=np.int64)
        starts = self.child_start[nodes]
        lens = self.child_start[nodes + 1] - starts
        total = int(lens.sum())
        row = np.repeat(np.arange(len(nodes)), lens)
        run_begin = np.repeat(np.cumsum(lens) - lens, lens)
        child = np.arange(total) - run_begin + np.repeat(starts, lens)
        if trie_filter is not None and total:
            keep = trie_filter.keep(child)
            row, child = row[keep], child[keep]
        return Children(row=row, code=self.node_code[child].astype(np.int64), node=child)

    def node_for_prefix(self, codes: Sequence[int]) -> int | None:
        """Node reached by a prefix of per-level codes, or None when no item has that prefix."""
        node = ROOT
        for level, code in enumerate(codes):
            flat = self.id_format.flat_code(level, int(code))
            lo, hi = int(self.child_start[node]), int(self.child_start[node + 1])
            # Children are sorted by code, so a binary search finds the edge.
            pos = lo + int(self.node_code[lo:hi].searchsorted(flat))
            if pos >= hi or int(self.node_code[pos]) != flat:
                return None
            node = pos
        return node

    def allowed_next(self, codes: Sequence[int], trie_filter: TrieFilter | None = None) -> list[int]:
        """Per-level codes allowed after a prefix (empty for a full ID or an unknown prefix)."""
        node = self.node_for_prefix(codes)
        if node is None:
            return []
        # One node's children are the contiguous run lo..hi: slice it directly (a few microseconds)
        # rather than going through the batched `children` and converting numpy scalars one by one.
        lo, hi = int(self.child_start[node]), int(self.child_start[node + 1])
        kids = self.node_code[lo:hi]
        if trie_filter is not None and hi > lo:
            kids = kids[trie_filter.keep(np.arange(lo, hi))]
        return (kids.astype(np.int64) - self.id_format.level_offset(len(codes))).tolist()

    def item_at(self, codes: Sequence[int]) -> int | None:
        node = self.node_for_prefix(codes)
        if node is None or len(codes) != self.depth:
            return None
        return int(self.node_item[node])

    def make_filter(self, exclude: Iterable[int] = (), allow: Iterable[int] | None = None) -> TrieFilter | None:
        """A filter that blocks the excluded item indices, or allows only `allow` minus `exclude`."""
        excluded = np.unique(np.fromiter(exclude, dtype=np.int64))
        if allow is not None:
            allowed = np.setdiff1d(np.fromiter(allow, dtype=np.int64), excluded)
            return TrieFilter(nodes=np.unique(self.item_path[allowed]), allow_only=True)
        if excluded.size == 0:
            return None
        nodes, counts = np.unique(self.item_path[excluded], return_counts=True)
        return TrieFilter(nodes=nodes[counts == self.items_below[nodes]], allow_only=False)
