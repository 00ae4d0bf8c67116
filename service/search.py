"""Catalog search by title words: an inverted index built once per bundle, queried without scanning.

Titles are split into words (`\\w+`, Unicode-aware, case-folded, accents removed). The index keeps, for
every distinct word in sorted order, the items whose title contains it and the word's first position
in that title, as flat CSR arrays (`start`, `items`, `positions`). Because the vocabulary is sorted,
the words that start with a prefix are one contiguous run found by bisection.

A query matches an item when every query word matches a title word, either whole or as a prefix
("pip" finds "pipette", which is what a picker needs while someone is typing); a one-character query
word only matches whole words, so "a" does not pull in half the catalog. Results are ranked by

1. how many query words matched only as a prefix (whole-word matches first),
2. the earliest position of a match in the title (a title that starts with the words first),
3. popularity (interaction counts from the bundle), highest first,
4. item index, so the order is deterministic.

All of it is vectorised with numpy, so a query costs a few array operations over the postings of
its words, not a pass over the catalog.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
_PREFIX_MIN_CHARS = 2
# Ranking value of a prefix-only match: after every whole-word match of any position.
_PREFIX_PENALTY = 1 << 20


def words(text: str) -> list[str]:
    """Lowercase words of a title or a query, in order, accents removed ("Zürich" -> "zurich")."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    if not folded.isascii():
        folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return _WORD.findall(folded)


@dataclass(frozen=True)
class SearchResult:
    indices: list[int]  # item indices, best first, at most `limit`
    total: int  # how many items matched


class TitleIndex:
    def __init__(self, titles: Sequence[str], popularity: Sequence[float] | np.ndarray | None = None):
        postings: dict[str, dict[int, int]] = {}
        for index, title in enumerate(titles):
            for position, word in enumerate(words(title)):
                postings.setdefault(word, {}).setdefault(index, min(position, _PREFIX_PENALTY - 1))
        self.vocab: list[str] = sorted(postings)
        sizes = np.fromiter((len(postings[w]) for w in self.vocab), dtype=np.int64, count=len(self.vocab))
        self.start = np.zeros(len(self.vocab) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.start[1:])
        total = int(self.start[-1])
        self.items = np.empty(total, dtype=np.int32)
        self.positions = np.empty(total, dtype=np.int32)
        for w, word in enumerate(self.vocab):
            lo, hi = self.start[w], self.start[w + 1]
            entries = postings[word]
            self.items[lo:hi] = np.fromiter(entries.keys(), dtype=np.int32, count=len(entries))
            self.positions[lo:hi] = np.fromiter(entries.values(), dtype=np.int32, count=len(entries))
        self.num_items = len(titles)
        pop = np.zeros(self.num_items, np.float64) if popularity is None else np.asarray(popularity, np.float64)
        if len(pop) != self.num_items:
            raise ValueError(f"{self.num_items} titles but {len(pop)} popularity values")
        self.popularity = pop

    @classmethod
    def from_bundle(cls, bundle: object) -> TitleIndex:
        return cls([item.title for item in bundle.items], getattr(bundle, "popularity", None))  # type: ignore[attr-defined]

    def _match(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct items matching one query word, and each one's best rank value (see module doc)."""
        lo = bisect_left(self.vocab, word)
        exact = lo < len(self.vocab) and self.vocab[lo] == word
        if len(word) >= _PREFIX_MIN_CHARS:
            hi = bisect_left(self.vocab, word + "\U0010ffff", lo)
        else:
            hi = lo + 1 if exact else lo
        if hi == lo:
            return np.empty(0, np.int32), np.empty(0, np.int64)
        seg_lo, seg_hi = int(self.start[lo]), int(self.start[hi])
        items = self.items[seg_lo:seg_hi]
        rank = self.positions[seg_lo:seg_hi].astype(np.int64)
        # The exact word's postings come first in its run (the sorted vocabulary puts "pip" before
        # "pipe"); every other word of the run is a prefix-only match.
        exact_end = int(self.start[lo + 1]) - seg_lo if exact else 0
        rank[exact_end:] += _PREFIX_PENALTY
        if hi - lo == 1:
            return items, rank  # one word: each item occurs once
        order = np.lexsort((rank, items))
        items, rank = items[order], rank[order]
        first = np.ones(len(items), dtype=bool)
        first[1:] = items[1:] != items[:-1]
        return items[first], rank[first]

    def search(self, query: str, limit: int = 10) -> SearchResult:
        terms = list(dict.fromkeys(words(query)))
        if not terms or limit < 1:
            return SearchResult([], 0)
        matched: list[tuple[np.ndarray, np.ndarray]] = []
        for term in terms:
            items, rank = self._match(term)
            if len(items) == 0:
                return SearchResult([], 0)
            matched.append((items, rank))
        matched.sort(key=lambda m: len(m[0]))  # intersect the rarest words first
        items, rank = matched[0]
        order = np.argsort(items, kind="stable")
        items, rank = items[order], rank[order]
        prefix_only = rank >= _PREFIX_PENALTY
        position = rank % _PREFIX_PENALTY
        count = prefix_only.astype(np.int64)
        for other_items, other_rank in matched[1:]:
            items, here, there = np.intersect1d(items, other_items, assume_unique=True, return_indices=True)
            if len(items) == 0:
                return SearchResult([], 0)
            count = count[here] + (other_rank[there] >= _PREFIX_PENALTY)
            position = np.minimum(position[here], other_rank[there] % _PREFIX_PENALTY)
        # np.lexsort sorts by the last key first.
        order = np.lexsort((items, -self.popularity[items], position, count))
        return SearchResult([int(i) for i in items[order[:limit]]], len(items))
