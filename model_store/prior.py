"""Collaborative prior: what counted item-to-item transitions say comes next after a history.

The semantic-ID model ranks items by what their text and the user's history suggest; transitions
counted in the training sequences carry the co-purchase signal that a small model learns slowly
(on amazon-industrial, weighted transitions alone reach HR@10 0.137). The prior mixes

    P(next | last item), P(item after next | second-to-last item), P(two steps on | last item)

with a little popularity (the weighted-transitions baseline of docs/training.md), plus,
with `history_weight` > 0, the next-item counts of the history items before the last, each place
further back weighted `history_decay` times less (what the whole history says, not just its last
two items; tuned on valid on top of the baseline's terms, docs/training.md), then
mixes in a uniform floor so that items never seen in training (3.5 % of amazon test targets) stay
reachable. With `normalise_rows` False (the default) each term is a count instead of a
probability (how often the pair was seen, not its share of the item's transitions), so a
transition seen in many sequences outweighs one seen once. The weighted-transitions baseline
chooses between the two on valid rows; on amazon-industrial valid picks counts, which give test
NDCG@10 0.1064 against 0.1049 with probabilities (docs/experiments/2026-12-02-*.md).

Decoding fuses it with the model in one of two ways (`PriorSettings.fusion`), both defined on every
trie node, so partial beams are ranked by what they can still reach (mass(n) is the prior
probability of the items below node n, m(n) the model's raw probability of the prefix up to n):

- "mixture" (the default of new priors): score(n) = log(w * mass(n) + (1 - w) * m(n)), the two as one
  distribution over items, the prior's share w. It is exact for prefixes too (the mixture's mass
  below n), and it lets the model rank the items the transitions know nothing about without pushing
  down the ones they are sure of (on amazon-industrial valid rows it ranks better than the product;
  docs/experiments/2026-12-05-amazon-recipe.md).
- "product" (shallow fusion, as language models are fused into speech recognisers):
  score(n) = log m(n) + strength * log mass(n); at a leaf, log p_model(ID) + strength * log p_prior(item).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import sparse

from model_store.trie import ROOT, ItemTrie

# How many of the latest history items the prior reads: the window the recipe trains the model on
# and the length of the shared data's valid/test histories.
HISTORY_SPAN = 10


@dataclass(frozen=True)
class PriorSettings:
    # Transition weights: last item, second-to-last item (skipping one), two steps from the last item.
    weights: tuple[float, float, float] = (1.0, 0.5, 0.1)
    # False: transition counts; True: each item's counts divided by its total, P(next | item).
    normalise_rows: bool = False
    popularity_weight: float = 1e-3
    # Next-item counts of the items before the last: the item p places back (p >= 2) weighs
    # history_weight * history_decay ** (p - 2). 0 keeps the weighted-transitions baseline's terms only.
    history_weight: float = 0.0
    history_decay: float = 0.5
    # Defaults chosen on amazon-industrial valid rows (docs/experiments/2026-12-05-amazon-recipe.md).
    floor: float = 0.02  # share of uniform mass, so items without transitions stay reachable
    fusion: Literal["mixture", "product"] = "mixture"
    strength: float = 2.0  # product fusion: weight of log p_prior against the model's log-probability
    mixture_weight: float = 0.8  # mixture fusion: the prior's share of the mixed distribution

    def __post_init__(self) -> None:
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ValueError(f"prior weights must be 3 numbers >= 0 (last, skip, two-step), got {list(self.weights)}")
        if not 0 < self.floor <= 1:
            raise ValueError(f"prior floor must be in (0, 1], got {self.floor}")
        if self.strength < 0:
            raise ValueError(f"prior strength must be >= 0, got {self.strength}")
        if self.history_weight < 0 or not 0 <= self.history_decay <= 1:
            raise ValueError(f"prior history_weight must be >= 0 and history_decay in [0, 1], got "
                             f"{self.history_weight}, {self.history_decay}")
        if self.popularity_weight < 0:
            raise ValueError(f"prior popularity_weight must be >= 0, got {self.popularity_weight}")
        if self.fusion not in ("mixture", "product"):
            raise ValueError(f"prior fusion must be 'mixture' or 'product', got {self.fusion!r}")
        if not 0 < self.mixture_weight < 1:
            raise ValueError(f"prior mixture_weight must be in (0, 1), got {self.mixture_weight}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PriorSettings:
        known: dict[str, Any] = {k: float(raw[k]) for k in ("popularity_weight", "floor", "strength", "mixture_weight",
                                                             "history_weight", "history_decay") if k in raw}
        known["fusion"] = str(raw.get("fusion", "product"))  # bundles written before "mixture" existed
        known["normalise_rows"] = bool(raw.get("normalise_rows", True))  # ... and before counts existed
        weights = tuple(float(w) for w in raw.get("weights", cls.weights))
        return cls(weights=weights, **known)  # __post_init__ validates

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> PriorSettings:
        """Settings from a training config: keys it leaves out take today's defaults (`from_dict`
        reads a manifest, where a missing key means a bundle written before that key existed)."""
        return cls.from_dict({**cls().to_dict(), **raw})


def _counts(edges: list[tuple[int, int]], n: int) -> sparse.csr_matrix:
    if not edges:
        return sparse.csr_matrix((n, n))
    a, b = zip(*edges)
    m = sparse.csr_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    m.sum_duplicates()
    return m


def _dense_row(m: sparse.csr_matrix, i: int) -> np.ndarray:
    """Row i of a CSR matrix as a dense vector, read off its arrays (scipy's m[i].toarray() builds a
    sparse matrix first: 24 against about 3 us per row on amazon-industrial, several rows a request)."""
    out = np.zeros(m.shape[1])
    start, end = m.indptr[i], m.indptr[i + 1]
    out[m.indices[start:end]] = m.data[start:end]
    return out


def _row_normalised(m: sparse.csr_matrix) -> sparse.csr_matrix:
    sums = np.asarray(m.sum(axis=1)).ravel()
    return (sparse.diags(1 / np.where(sums > 0, sums, 1)) @ m).tocsr()


@dataclass(frozen=True)
class NodeFusion:
    """One request's prior term for the beam search (see the module docstring).

    product (model_log_weight None): score(n) = model(n) + term[n]
    mixture: score(n) = logaddexp(term[n], model_log_weight + model(n)), term = log w + log mass
    """

    term: np.ndarray  # float64 [trie nodes]
    model_log_weight: float | None


class TransitionPrior:
    """Next-item scores over item indices 0..num_items-1 from counted transitions."""

    def __init__(self, c1: sparse.csr_matrix, c_skip: sparse.csr_matrix, popularity: np.ndarray,
                 settings: PriorSettings = PriorSettings()):
        self.c1 = c1.tocsr()  # count(last -> next)
        self.c_skip = c_skip.tocsr()  # count(second-to-last -> the item two later)
        for m in (self.c1, self.c_skip):
            m.sum_duplicates()  # one entry per pair, as _dense_row reads them
        self.p1 = _row_normalised(self.c1)  # P(next | last)
        self.p_skip = _row_normalised(self.c_skip)  # P(item two later | second-to-last)
        self._p1_t = self.p1.T.tocsr()  # the two-step term's matrix, transposed once instead of per request
        self.popularity = np.asarray(popularity, dtype=np.float64)  # sums to 1 (or all zero)
        self.settings = settings

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], num_items: int,
            settings: PriorSettings = PriorSettings()) -> TransitionPrior:
        """Count transitions in sequences of item indices (chronological, one per user)."""
        pairs: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
        counts = np.zeros(num_items, dtype=np.float64)
        for seq in sequences:
            ids = [int(i) for i in seq]
            np.add.at(counts, ids, 1)
            for gap in (1, 2):
                pairs[gap] += list(zip(ids[:-gap], ids[gap:]))
        popularity = counts / counts.sum() if counts.sum() else counts
        return cls(_counts(pairs[1], num_items), _counts(pairs[2], num_items), popularity, settings)

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    def refit(self, sequences: Iterable[Sequence[int]]) -> TransitionPrior:
        """The same settings and catalog, counts from other sequences."""
        return TransitionPrior.fit(sequences, self.num_items, self.settings)

    def with_settings(self, **changes: Any) -> TransitionPrior:
        return TransitionPrior(self.c1, self.c_skip, self.popularity, replace(self.settings, **changes))

    def scores(self, history: Sequence[int]) -> np.ndarray:
        """The unnormalised transition mix (the weighted-transitions baseline's ranking score, plus
        the earlier history's term when `history_weight` > 0)."""
        known = [int(i) for i in history if 0 <= int(i) < self.num_items]
        last = _dense_row(self.c1, known[-1]) if known else None
        skip = _dense_row(self.c_skip, known[-2]) if len(known) >= 2 else None
        earlier = None
        if self.settings.history_weight and len(known) >= 2:
            earlier = np.vstack([_dense_row(self.c1, i) for i in self._earlier(known)])
        return self._mix(last, skip, earlier)

    @staticmethod
    def _earlier(known: Sequence[int]) -> list[int]:
        """The items before the last, most recent first, within the history span."""
        return list(known[-2::-1][: HISTORY_SPAN - 1])

    def _mix(self, last: np.ndarray | None, skip: np.ndarray | None, earlier: np.ndarray | None = None) -> np.ndarray:
        """The weighted mix of the last item's transition counts, the second-to-last item's skip
        counts and the earlier items' transition counts (dense rows, most recent first; None when
        the history is too short), by the settings."""
        w_last, w_skip, w_two = self.settings.weights
        out = self.settings.popularity_weight * self.popularity

        def scaled(row: np.ndarray) -> np.ndarray:
            total = row.sum()
            return row / total if self.settings.normalise_rows and total > 0 else row

        if last is not None:
            last = scaled(last)
            out = out + w_last * last
            if w_two:  # where the next items lead, on the scale of the first term
                out = out + w_two * (self._p1_t @ last)
        if skip is not None and w_skip:
            out = out + w_skip * scaled(skip)
        if earlier is not None and len(earlier) and self.settings.history_weight:
            if self.settings.normalise_rows:
                totals = earlier.sum(axis=1, keepdims=True)
                earlier = earlier / np.where(totals > 0, totals, 1)
            coef = self.settings.history_weight * self.settings.history_decay ** np.arange(len(earlier))
            out = out + coef @ earlier
        return out

    def _distribution(self, s: np.ndarray) -> np.ndarray:
        """A mix of scores as a proper distribution: normalised, plus the uniform floor."""
        total = s.sum()
        floor = self.settings.floor
        uniform = 1.0 / self.num_items
        return (1 - floor) * s / total + floor * uniform if total > 0 else np.full(self.num_items, uniform)

    def item_probs(self, history: Sequence[int]) -> np.ndarray:
        """A proper distribution over all items: the normalised mix plus the uniform floor."""
        return self._distribution(self.scores(history))

    def held_out_log_probs(self, sequence: Sequence[int]) -> np.ndarray:
        """float64 [len(sequence) - 1]: log item_probs(sequence[:t])[sequence[t]] for t = 1.., with the
        sequence's own transitions taken out of the counts, as if its user had never been counted.

        What the prior says about a training transition when serving someone new: a model trained
        to complement the prior (training.sft, the fused objective) must not learn that the prior
        already knows every pair it was counted from. (Popularity and the two-step term's
        P(next | item) keep the user's counts: both are small and second order.)"""
        ids = [int(i) for i in sequence]
        own = {gap: _counts(list(zip(ids[:-gap], ids[gap:], strict=True)), self.num_items) for gap in (1, 2)}

        def held_out_row(counts: sparse.csr_matrix, gap: int, item: int) -> np.ndarray:
            # >= 0 for a sequence the counts never saw, too
            return np.maximum(_dense_row(counts, item) - _dense_row(own[gap], item), 0.0)

        out = np.empty(max(0, len(ids) - 1))
        for t in range(1, len(ids)):
            earlier = None
            if self.settings.history_weight and t >= 2:
                earlier = np.vstack([held_out_row(self.c1, 1, i) for i in self._earlier(ids[max(0, t - HISTORY_SPAN): t])])
            s = self._mix(held_out_row(self.c1, 1, ids[t - 1]),
                          held_out_row(self.c_skip, 2, ids[t - 2]) if t >= 2 else None, earlier)
            out[t - 1] = math.log(self._distribution(s)[ids[t]])
        return out

    def node_fusion(self, history: Sequence[int], trie: ItemTrie, exclude: Iterable[int] = (),
                    allow: Iterable[int] | None = None) -> NodeFusion:
        """What this request's prior adds to the beam search, by the settings' fusion."""
        if self.settings.fusion == "mixture":
            w = self.settings.mixture_weight
            return NodeFusion(math.log(w) + self.node_log_mass(history, trie, exclude, allow), math.log1p(-w))
        return NodeFusion(self.node_bias(history, trie, exclude, allow), None)

    def node_bias(self, history: Sequence[int], trie: ItemTrie, exclude: Iterable[int] = (),
                  allow: Iterable[int] | None = None) -> np.ndarray:
        """float64 [trie nodes]: the product fusion's term, strength * node_log_mass; 0 at the root."""
        if self.settings.strength == 0:
            return np.zeros(trie.num_nodes)
        return self.settings.strength * self.node_log_mass(history, trie, exclude, allow)

    def node_log_mass(self, history: Sequence[int], trie: ItemTrie, exclude: Iterable[int] = (),
                      allow: Iterable[int] | None = None) -> np.ndarray:
        """float64 [trie nodes]: log of the prior mass below each node; 0 at the root.

        Items the request cannot get (`exclude`, or outside `allow`) add no mass, so partial beams are
        not drawn towards subtrees they cannot return; such nodes get -inf, and the request's trie
        filter blocks them anyway. A leaf's value stays log p(item).
        """
        if trie.num_items != self.num_items:
            raise ValueError(f"prior covers {self.num_items} items, the trie {trie.num_items}")
        p = self.item_probs(history)
        if allow is not None:
            keep = np.zeros(self.num_items, dtype=bool)
            keep[np.fromiter(allow, dtype=np.int64)] = True
            p = np.where(keep, p, 0.0)
        blocked = np.fromiter(exclude, dtype=np.int64)
        if blocked.size:
            p = p.copy() if allow is None else p
            p[blocked] = 0.0
        mass = np.bincount(trie.item_path.ravel(), weights=np.repeat(p, trie.depth), minlength=trie.num_nodes)
        mass[ROOT] = 1.0
        with np.errstate(divide="ignore"):
            return np.log(mass)

    def extended(self, num_items: int) -> TransitionPrior:
        """The same prior over a catalog grown to `num_items` (new items have no transitions yet)."""
        if num_items < self.num_items:
            raise ValueError(f"cannot shrink a prior from {self.num_items} to {num_items} items")
        grow = num_items - self.num_items

        def pad(m: sparse.csr_matrix) -> sparse.csr_matrix:
            return sparse.csr_matrix((m.data, m.indices, np.concatenate([m.indptr, np.full(grow, m.indptr[-1])])),
                                     shape=(num_items, num_items))

        return TransitionPrior(pad(self.c1), pad(self.c_skip), np.concatenate([self.popularity, np.zeros(grow)]),
                               self.settings)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {"popularity": self.popularity}
        for name, m in (("c1", self.c1), ("c_skip", self.c_skip)):
            arrays |= {f"{name}_data": m.data, f"{name}_indices": m.indices, f"{name}_indptr": m.indptr}
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path, settings: PriorSettings) -> TransitionPrior:
        with np.load(path) as data:
            n = len(data["popularity"])
            # Priors saved before counts were kept hold P(next | item) only ("p1", "p_skip"); their
            # settings say normalise_rows, and normalising those rows again changes nothing.
            names = ("c1", "c_skip") if "c1_data" in data else ("p1", "p_skip")
            mats = [sparse.csr_matrix((data[f"{name}_data"], data[f"{name}_indices"], data[f"{name}_indptr"]),
                                      shape=(n, n)) for name in names]
            if names[0] == "p1" and not settings.normalise_rows:
                raise ValueError(f"{path} holds transition probabilities only; its settings must keep "
                                 "normalise_rows (refit the prior from interactions for counts)")
            return cls(mats[0], mats[1], data["popularity"], settings)
