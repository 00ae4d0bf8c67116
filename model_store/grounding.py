"""What a reasoning chain may name, and the one validator every chain is held to.

A chain (model_store.tokens.reasoning_text) is five labelled lines in the curriculum's fixed order.
Every title, brand or theme it states is a mention, written between MENTION_OPEN and MENTION_CLOSE.
A chain is faithful when every mention names something the history (or, for a training target, the
returned item) has, no other catalog name appears outside a mention, the rewrite section lists only
history IDs, no word 4-gram repeats more than twice and it has some substance (>= 12 words).

The decoder enforces this by construction (model_store.chain_automaton); `validate_chain` checks it
after the fact, for the curriculum, the teacher's text, the tests and `gream eval --mode reasoning`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model_store import tokens
from model_store.themes import item_themes

if TYPE_CHECKING:
    from model_store.bundle import Bundle

_MENTION = re.compile(re.escape(tokens.MENTION_OPEN) + r"([^" + re.escape(tokens.MENTION_OPEN + tokens.MENTION_CLOSE)
                      + r"\n]*)" + re.escape(tokens.MENTION_CLOSE))
_ID = re.compile(r"(?:<[a-j]_[0-9]+>)+")
_WORDS = re.compile(r"[a-z0-9][a-z0-9\-&']*")
MIN_WORDS = 12
NGRAM = 4
MAX_NGRAM_REPEATS = 2


@dataclass(frozen=True)
class ItemNames:
    """The names a chain may use for one item, in their mention form."""

    index: int
    item_id: str
    spelled_id: str
    title: str
    brand: str
    theme: str

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.title, self.brand, self.theme) if n)


def _key(name: str) -> str:
    return " ".join(_WORDS.findall(name.lower()))


class GroundingIndex:
    """Every item's names, and the catalog's names for finding a name stated outside a mention."""

    def __init__(self, bundle: Bundle, themes: Sequence[str] | None = None):
        themes = list(themes) if themes is not None else item_themes(bundle)
        self.items = [ItemNames(i, it.item_id, bundle.spelled_id(i),
                                tokens.mention_name(it.title, tokens.MENTION_TITLE_WORDS),
                                tokens.mention_name(it.brand or ""), tokens.mention_name(themes[i]))
                      for i, it in enumerate(bundle.items)]
        self.id_format = bundle.id_format
        # Names made only of template words ("items", "new") cannot be told from the template itself.
        self.catalog_names = frozenset(
            k for it in self.items for k in map(_key, it.names())
            if k and not set(k.split()) <= tokens.TEMPLATE_WORDS)
        self.longest_name = max((len(k.split()) for k in self.catalog_names), default=1)
        self._by_spelled = {it.spelled_id: it for it in self.items}

    def names_of(self, indices: Sequence[int]) -> list[ItemNames]:
        return [self.items[i] for i in indices]

    def history_of_prompt(self, prompt: str) -> list[ItemNames]:
        """The history items of a reasoning or direct prompt, oldest first."""
        return [self._by_spelled[s] for s in tokens.history_in_prompt(prompt, self.id_format)
                if s in self._by_spelled]

    def name_words(self) -> frozenset[str]:
        """Words that start a brand or theme: free text outside a mention may not use them."""
        words = set()
        for it in self.items:
            for name in (it.brand, it.theme):
                first = _key(name).split()[:1]
                if first and len(first[0]) >= 2 and first[0] not in tokens.TEMPLATE_WORDS:
                    words.add(first[0])
        return frozenset(words)


@dataclass(frozen=True)
class Section:
    stage: str
    body: str


def split_sections(text: str) -> list[Section]:
    """The labelled lines of a chain, in their order; unlabelled lines are kept as stage ''."""
    out = []
    for line in text.split(tokens.SECTION_SEPARATOR):
        stage = next((s for s, label in tokens.REASONING_LABELS.items() if line.startswith(label)), "")
        body = line[len(tokens.REASONING_LABELS[stage]):] if stage else line
        out.append(Section(stage, body.strip()))
    return out


def mentions(text: str) -> list[str]:
    return [m.strip() for m in _MENTION.findall(text)]


def word_ngram_counts(text: str, n: int = NGRAM) -> Counter[tuple[str, ...]]:
    words = text.split()
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def repeated_ngram_rate(text: str, n: int = NGRAM) -> float:
    """Share of the chain's word n-grams that repeat an earlier one (0 for none)."""
    counts = word_ngram_counts(text, n)
    total = sum(counts.values())
    return (total - len(counts)) / total if total else 0.0


def validate_chain(text: str, history_items: Sequence[ItemNames], returned_items: Sequence[ItemNames] = (),
                   catalog: GroundingIndex | None = None, *, stages: Sequence[str] = tokens.REASONING_STAGES,
                   min_words: int = MIN_WORDS) -> list[str]:
    """Every way `text` fails to be a faithful chain; empty when it passes. With `catalog`, names of
    other catalog items stated outside a mention are caught too."""
    problems = []
    sections = split_sections(text)
    got = [s.stage for s in sections]
    if got != list(stages):
        problems.append(f"sections {got} are not {list(stages)}")
    allowed = {_key(n) for it in [*history_items, *returned_items] for n in it.names()}
    for name in mentions(text):
        if _key(name) not in allowed:
            problems.append(f"mention [{name}] is not in the history")
    outside = _MENTION.sub(" ", text)
    if tokens.MENTION_OPEN in outside or tokens.MENTION_CLOSE in outside:
        problems.append("a mention is not closed")
    history_ids = {it.spelled_id for it in history_items}
    for section in sections:
        if section.stage == "rewrite":
            for run in _ID.findall(section.body):
                spelled = _spelled_ids(run)
                stray = [s for s in spelled if s not in history_ids]
                if stray:
                    problems.append(f"rewrite names items outside the history: {stray}")
    if _ID.search("\n".join(s.body for s in sections if s.stage != "rewrite")):
        problems.append("an item ID outside the rewrite section")
    if catalog is not None:
        words = _WORDS.findall(_ID.sub(" ", outside).lower())
        for n in range(1, catalog.longest_name + 1):
            for i in range(len(words) - n + 1):
                key = " ".join(words[i:i + n])
                if key in catalog.catalog_names and key not in allowed:
                    problems.append(f"'{key}' is named outside a mention and is not in the history")
    repeats = [g for g, c in word_ngram_counts(text).items() if c > MAX_NGRAM_REPEATS]
    if repeats:
        problems.append(f"word {NGRAM}-grams repeated more than {MAX_NGRAM_REPEATS} times: {repeats[:3]}")
    if len(text.split()) < min_words:
        problems.append(f"only {len(text.split())} words (at least {min_words})")
    return problems


def _spelled_ids(run: str) -> list[str]:
    """The IDs of a run of ID tokens: each starts at a level-a token."""
    return re.findall(r"<a_[0-9]+>(?:<[b-j]_[0-9]+>)*", run)


def cite_sections(text: str, history_items: Sequence[ItemNames]) -> list[tuple[str, list[str]]]:
    """(stage, ids of the history items the section names), one entry per labelled section. A brand
    or theme cites every history item that has it; the rewrite section cites the IDs it lists."""
    by_name: dict[str, list[str]] = {}
    for it in history_items:
        for name in it.names():
            ids = by_name.setdefault(_key(name), [])
            if it.item_id not in ids:
                ids.append(it.item_id)
    by_spelled = {it.spelled_id: it.item_id for it in history_items}
    out = []
    for section in split_sections(text):
        if not section.stage:
            continue
        cited: list[str] = []
        for name in mentions(section.body):
            cited += [i for i in by_name.get(_key(name), []) if i not in cited]
        if section.stage == "rewrite":
            for spelled in _spelled_ids(section.body):
                item = by_spelled.get(spelled)
                if item is not None and item not in cited:
                    cited.append(item)
        out.append((section.stage, cited))
    return out
