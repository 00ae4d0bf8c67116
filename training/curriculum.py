"""The reasoning curriculum: synthetic chains of thought in five stages, built from the data itself.

For a training window (history -> target) the reasoning has up to five labelled sections, introduced
one stage at a time (stage s trains on sections 1..s):

1. behavioural evidence extraction: the recent items, brands and themes that repeat in the history;
2. latent preference modelling: the theme (and brand) the user keeps returning to;
3. intent inference: what the user needs next, after the last item's theme;
4. recommendation formulation: the kind of item to recommend;
5. denoised sequence rewriting: the history with off-intent items removed (a subsequence, as IDs).

Everything comes from the catalog and the training interactions: an item's *theme* is its category
when the catalog has one, else a label of its first semantic-ID code made of the words that set that
cluster's titles apart (Amazon Industrial has no categories); theme-to-theme transitions are counted
on the training sequences. The target item itself never appears in the reasoning (not its ID, not its
title); windows where it cannot be kept out (target inside the history) are skipped. Only the answer
after THINK_END names it.

An optional teacher (`TeacherClient`, any OpenAI-compatible chat endpoint) can write sections 1-4
instead of the templates. Template and teacher chains alike must pass model_store.grounding's
validator (every name a mention the history supports, the sections in order, no loops) and must not
leak the target; a teacher answer that fails is replaced by the templates, a window whose template
chain fails is skipped. All wording lives in model_store.tokens.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from tqdm.auto import tqdm

from model_store import tokens
from model_store.bundle import Bundle
from model_store.grounding import MIN_WORDS, GroundingIndex, validate_chain
from model_store.themes import item_themes
from training.data import next_item_windows
from training.tasks import Example, short_title

STAGES = tokens.REASONING_STAGES


class ThemeIndex:
    """Per item: its theme (model_store.themes) and names (model_store.grounding); theme transitions
    counted on the training sequences."""

    def __init__(self, bundle: Bundle, sequences: dict[str, list[str]] | None = None, label_words: int = 2):
        self.bundle = bundle
        self.theme_of = item_themes(bundle, label_words)
        self.names = GroundingIndex(bundle, self.theme_of)
        self.transitions: dict[str, Counter[str]] = defaultdict(Counter)
        for seq in (sequences or {}).values():
            idx = [bundle.index_of[i] for i in seq if i in bundle.index_of]
            for a, b in pairwise(idx):
                self.transitions[self.theme_of[a]][self.theme_of[b]] += 1

    def related(self, a: str, b: str, min_count: int = 2) -> bool:
        return a == b or self.transitions[a][b] >= min_count


@dataclass(frozen=True)
class CurriculumConfig:
    max_history: int = 10
    recent_items: int = 3
    title_words: int = 6
    min_transition: int = 2  # theme transitions seen this often make a history item "on intent"
    max_examples: int | None = None  # per stage; None uses every training window
    seed: int = 0


def build_sections(themes: ThemeIndex, history: Sequence[int], target: int, cfg: CurriculumConfig,
                   stages: int = len(STAGES)) -> list[tuple[str, str]] | None:
    """The first `stages` reasoning sections for one window of item indices; None when the target
    cannot be kept out of the reasoning (it is in the history, or shares a shown title) or the chain
    fails the validator. Every name is a mention of something the history holds, in the form the
    serving decoder allows (model_store.grounding); the target's theme and brand are named only when
    the history has them."""
    bundle = themes.bundle
    if not history or target in history:
        return None
    names = themes.names.items
    hist_themes = [names[i].theme for i in history]
    target_theme = names[target].theme
    # Recency-weighted counts: later items count more, so preference follows the user's drift.
    weight = Counter()
    for pos, theme in enumerate(hist_themes):
        weight[theme] += 1 + pos / len(hist_themes)
    brands = Counter(names[i].brand for i in history if names[i].brand)
    theme_counts = Counter(hist_themes)
    recent = list(dict.fromkeys(short_title(names[i].title, cfg.title_words) for i in history[-cfg.recent_items:]))
    top_theme = max(weight, key=lambda t: (weight[t], t))
    top_brand, top_brand_n = (brands.most_common(1)[0] if brands else (None, 0))
    target_brand = names[target].brand if names[target].brand and brands[names[target].brand] else None
    shown_theme = target_theme if target_theme in theme_counts else None
    sections: list[tuple[str, str]] = [
        ("evidence", tokens.evidence_phrase(recent, [(b, n) for b, n in brands.most_common(2) if n > 1],
                                            [(t, n) for t, n in theme_counts.most_common(2) if n > 1])),
        ("preference", tokens.preference_phrase(top_theme, top_brand, top_brand_n > 1)),
        ("intent", tokens.intent_phrase(shown_theme, hist_themes[-1], target_theme == hist_themes[-1])),
        ("recommendation", tokens.recommendation_phrase(shown_theme, target_brand)),
    ]
    kept = [i for i, t in zip(history, hist_themes, strict=True)
            if themes.related(t, target_theme, cfg.min_transition)] or [history[-1]]
    sections.append(("rewrite", tokens.rewrite_phrase([bundle.spelled_id(i) for i in kept])))
    sections = sections[:stages]
    if not faithful(themes, history, target, sections):
        return None
    return sections


def faithful(themes: ThemeIndex, history: Sequence[int], target: int, sections: Sequence[tuple[str, str]]) -> bool:
    """The chain passes the validator serving is held to (history mentions only) and does not leak
    the target."""
    text = tokens.reasoning_text(sections)
    stages = [s for s, _ in sections]
    full = len(stages) == len(STAGES)
    problems = validate_chain(text, themes.names.names_of(history), (), themes.names, stages=stages,
                              min_words=MIN_WORDS if full else 0)
    return not problems and not leaks(text, themes.bundle, target)


def leaks(reasoning: str, bundle: Bundle, target: int, title_words: int = 6) -> bool:
    """True when the reasoning names the target: its ID, or the start of its title."""
    if bundle.spelled_id(target) in reasoning:
        return True
    title = short_title(bundle.items[target].title, title_words)
    return len(title) >= 8 and title.lower() in reasoning.lower()


def denoised_subsequence(bundle: Bundle, sections: Sequence[tuple[str, str]]) -> list[int]:
    """Item indices named by the rewrite section (for checks): parsed back from the spelled IDs."""
    text = dict(sections).get("rewrite", "")
    depth = bundle.id_format.depth
    found = re.findall(r"<[a-j]_[0-9]+>", text)
    out = []
    for start in range(0, len(found) - depth + 1, depth):
        item = bundle.trie.item_at(bundle.id_format.parse("".join(found[start: start + depth])))
        if item is not None:
            out.append(item)
    return out


class TeacherClient:
    """Sections 1-4 written by an OpenAI-compatible chat endpoint (`POST {url}/chat/completions`)."""

    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 256):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model
        self.max_tokens = max_tokens
        self.failures = 0
        self.rejected = 0  # answers that failed the validator and were replaced by the templates

    def sections(self, history_titles: Sequence[str], target_title: str, stages: Sequence[str]
                 ) -> dict[str, str] | None:
        body = {"model": self.model, "temperature": 0.3, "max_tokens": self.max_tokens, "messages": [
            {"role": "system", "content": tokens.TEACHER_SYSTEM_PROMPT},
            {"role": "user", "content": tokens.teacher_user_prompt(history_titles, target_title, stages)},
        ]}
        try:
            resp = self.client.post("/chat/completions", json=body)
            resp.raise_for_status()
            text = resp.json()["choices"][0]["message"]["content"]
        except Exception:  # noqa: BLE001 - any endpoint failure falls back to the templates
            self.failures += 1
            return None
        out = {}
        for line in text.splitlines():
            for stage in stages:
                label = tokens.REASONING_LABELS[stage]
                if line.strip().startswith(label):
                    out[stage] = " ".join(line.strip()[len(label):].split())[:300]
        return out if all(out.get(s) for s in stages) else None


def curriculum_windows(bundle: Bundle, sequences: dict[str, list[str]], cfg: CurriculumConfig
                       ) -> list[tuple[list[int], int]]:
    """(history indices, target index) windows of the training sequences, subsampled if configured."""
    windows = []
    for seq in sequences.values():
        idx = [bundle.index_of[i] for i in seq if i in bundle.index_of]
        windows += next_item_windows(idx, cfg.max_history)
    if cfg.max_examples and len(windows) > cfg.max_examples:
        windows = random.Random(cfg.seed).sample(windows, cfg.max_examples)
    return windows


def curriculum_examples(bundle: Bundle, sequences: dict[str, list[str]], stages: int,
                        cfg: CurriculumConfig | None = None, themes: ThemeIndex | None = None,
                        teacher: TeacherClient | None = None) -> list[Example]:
    """Reasoning-mode examples whose reasoning holds the first `stages` sections."""
    cfg = cfg or CurriculumConfig()
    themes = themes or ThemeIndex(bundle, sequences)
    out = []
    windows = curriculum_windows(bundle, sequences, CurriculumConfig(**{**cfg.__dict__, "seed": cfg.seed + stages}))
    for history, target in tqdm(windows, desc=f"curriculum stage {stages}", unit="ex", leave=False,
                                disable=len(windows) < 5000):
        sections = build_sections(themes, history, target, cfg, stages)
        if sections is None:
            continue
        if teacher is not None:
            wanted = [s for s, _ in sections if s != "rewrite"]
            written = teacher.sections([bundle.items[i].title for i in history], bundle.items[target].title, wanted)
            if written:
                candidate = [(s, written.get(s, text)) for s, text in sections]
                if faithful(themes, history, target, candidate):
                    sections = candidate
                else:
                    teacher.rejected += 1
        spelled = [bundle.spelled_id(i) for i in history]
        out.append(Example(tokens.reasoning_prompt(spelled),
                           tokens.reasoning_completion(tokens.reasoning_text(sections), bundle.spelled_id(target)),
                           f"reason_{stages}"))
    return out


def tokenizer_corpus(bundle: Bundle, sequences: dict[str, list[str]], n: int = 400, seed: int = 0) -> list[str]:
    """Sample reasoning texts (without IDs) so a catalog-trained tokenizer learns the template words."""
    themes = ThemeIndex(bundle, sequences)
    cfg = CurriculumConfig(max_examples=n, seed=seed)
    texts = []
    for history, target in curriculum_windows(bundle, sequences, cfg):
        sections = build_sections(themes, history, target, cfg, len(STAGES) - 1)
        if sections:
            texts.append(tokens.reasoning_text(sections))
    return texts


def describe(example: Example) -> dict[str, Any]:
    """Reasoning and answer of a reasoning example (for logs and tests)."""
    body = example.completion.split(tokens.reasoning_answer_suffix())[0]
    return {"reasoning": body, "answer": example.completion[len(body) + len(tokens.reasoning_answer_suffix()):]}
