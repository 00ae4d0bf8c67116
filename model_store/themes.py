"""Each item's theme: a short label the reasoning may name, shared by training and serving.

An item's theme is its category's last part when the catalog has categories, else a label of its
first semantic-ID code made of the words that set that cluster's titles apart (Amazon Industrial has
no categories). Serving builds the same labels from the bundle, so the grounding constraint
(model_store.grounding) allows exactly the themes the curriculum taught.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_store.bundle import Bundle

_WORD = re.compile(r"[A-Za-z][A-Za-z\-]{2,}")
_STOP_WORDS = (
    "the and for with from pack inch inches count set pcs piece pieces new high low mm cm ft lb lbs oz size "
    "black white blue red green yellow silver clear grey gray large small medium mini heavy duty premium "
    "quality professional industrial standard type model series style use kit per each one two three four "
    "five six ten x-large assorted replacement compatible various made usa")
_STOP = frozenset(_STOP_WORDS.split())


def theme_words(title: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(title) if w.lower() not in _STOP]


def item_themes(bundle: Bundle, label_words: int = 2) -> list[str]:
    """The theme label of every item of the bundle, by item index."""
    items = bundle.items
    if any(it.categories for it in items):
        return [(it.categories.split(" > ")[-1] if it.categories else "other items").lower() for it in items]
    first = [int(c) for c in bundle.codes[:, 0]]
    words_by_cluster: dict[int, Counter[str]] = defaultdict(Counter)
    for i, it in enumerate(items):
        words_by_cluster[first[i]].update(set(theme_words(it.title)))
    df = Counter(w for counts in words_by_cluster.values() for w in counts)
    n_clusters = max(1, len(words_by_cluster))
    label: dict[int, str] = {}
    for cluster, counts in words_by_cluster.items():
        # Frequent in the cluster, rare across clusters (tf-idf over clusters).
        scored = sorted(counts, key=lambda w: (-counts[w] * math.log(1 + n_clusters / df[w]), w))
        label[cluster] = " ".join(scored[:label_words]) or f"group {cluster}"
    return [f"{label[first[i]]} items" for i in range(len(items))]
