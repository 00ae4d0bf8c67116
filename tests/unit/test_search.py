"""The title index behind GET /v1/items?q=: matching (whole words or prefixes, case and accents
ignored, every word required) and ranking (whole words, then position, then popularity)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.search import TitleIndex, words

TITLES = [
    "Acme pipette model 0",         # 0
    "Pipette stand for pipettes",   # 1
    "Globex beaker model 12",       # 2
    "Globex beaker model 120",      # 3
    "a b c",                        # 4
    "Zürich Glove, nitrile",        # 5
    "Glove box",                    # 6
]
POPULARITY = [5, 1, 3, 9, 0, 2, 7]


def test_words_are_case_and_accent_folded() -> None:
    assert words("Zürich GLOVE, nitrile-free") == ["zurich", "glove", "nitrile", "free"]
    assert words("  !!  ") == []


def test_every_word_must_match_whole_or_as_a_prefix() -> None:
    index = TitleIndex(TITLES, POPULARITY)
    assert index.search("pipette").indices == [1, 0]  # position 0 beats position 1
    assert index.search("PIP").indices == [1, 0]
    assert index.search("glove zur").indices == [5]
    assert index.search("globex 12").indices == [2, 3]  # whole "12" before the prefix match "120"
    assert index.search("acme beaker").total == 0
    assert index.search("nothing").total == 0


def test_one_letter_words_match_whole_words_only() -> None:
    index = TitleIndex(TITLES, POPULARITY)
    assert index.search("a").indices == [4]
    assert index.search("g").total == 0


def test_popularity_breaks_ties_and_limit_caps() -> None:
    index = TitleIndex(TITLES, POPULARITY)
    assert index.search("model").indices == [3, 0, 2]  # all at position 2: by popularity
    found = index.search("model", limit=1)
    assert found.indices == [3] and found.total == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["alpha", "beta", "gamma", "alphabet", "be", "delta"]), min_size=1, max_size=4),
       st.lists(st.sampled_from(["alpha", "be", "gam", "delt", "x"]), min_size=1, max_size=3))
def test_matches_agree_with_a_scan(title_words: list[str], query: list[str]) -> None:
    titles = [" ".join(title_words), " ".join(reversed(title_words)), "unrelated words"]
    index = TitleIndex(titles, np.arange(len(titles), dtype=np.float32))
    expected = {i for i, t in enumerate(titles)
                if all(any(w == q or (len(q) > 1 and w.startswith(q)) for w in words(t)) for q in query)}
    found = index.search(" ".join(query), limit=10)
    assert set(found.indices) == expected and found.total == len(expected)
