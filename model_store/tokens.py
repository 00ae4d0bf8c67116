"""The one place that spells semantic-ID tokens, special tokens and prompt templates.

Training builds its examples from these templates and serving builds its prompts from them, so the
two can never drift apart. Nothing else in the project writes `<a_12>` or `<|answer|>` by hand.

Prompt layout (docs/architecture.md, "Prompt layout and caching"): a fixed preamble, then the history oldest
first, then a short mode-specific suffix. A user's successive prompts therefore share their prefix,
which the engine's prefix cache reuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PROMPT_FORMAT_VERSION = "gream-prompt-v1"

LEVEL_NAMES = "abcdefghij"  # level 0 is `a`, the de-duplication level takes the letter after the last

# Special tokens. The answer marker ends every prompt that expects an item ID next, so that the
# constrained decoder always starts right after it, in every mode and every task.
ANSWER = "<|answer|>"
THINK_START = "<think>"
THINK_END = "</think>"
HISTORY_START = "<|history|>"
HISTORY_END = "<|/history|>"
SPECIAL_TOKENS: tuple[str, ...] = (ANSWER, THINK_START, THINK_END, HISTORY_START, HISTORY_END)

# Tokens of a tokenizer we build from scratch (training/backbone.py); HF tokenizers bring their own.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

_TOKEN_RE = re.compile(r"<([a-j])_([0-9]+)>")

PREAMBLE = "Recommend the next item for a user who interacted with these items, oldest first:"


@dataclass(frozen=True)
class IdFormat:
    """Shape of a semantic ID: `levels` quantised codes of `codebook_size` values each, then one
    de-duplication code of `dedup_size` values. Every item's ID has exactly `depth` tokens."""

    levels: int = 3
    codebook_size: int = 256
    dedup_size: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= len(LEVEL_NAMES) - 1:
            raise ValueError(f"levels must be in 1..{len(LEVEL_NAMES) - 1}, got {self.levels}")
        if self.codebook_size < 2 or self.dedup_size < 1:
            raise ValueError("codebook_size must be >= 2 and dedup_size >= 1")

    @property
    def depth(self) -> int:
        return self.levels + 1

    def level_size(self, level: int) -> int:
        return self.dedup_size if level == self.levels else self.codebook_size

    def level_offset(self, level: int) -> int:
        """Index of (level, 0) in the flat list of all ID tokens (`all_tokens`)."""
        return level * self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.levels * self.codebook_size + self.dedup_size

    def token(self, level: int, code: int) -> str:
        if not 0 <= code < self.level_size(level):
            raise ValueError(f"code {code} out of range for level {level}")
        return f"<{LEVEL_NAMES[level]}_{code}>"

    def all_tokens(self) -> list[str]:
        """Every ID token, level by level; position i is flat code i (see `flat_code`)."""
        return [self.token(lv, c) for lv in range(self.depth) for c in range(self.level_size(lv))]

    def flat_code(self, level: int, code: int) -> int:
        return self.level_offset(level) + code

    def spell(self, codes: Sequence[int]) -> str:
        if len(codes) != self.depth:
            raise ValueError(f"an ID has {self.depth} codes, got {len(codes)}")
        return "".join(self.token(lv, int(c)) for lv, c in enumerate(codes))

    def parse(self, text: str) -> tuple[int, ...]:
        """Codes of one spelled ID; raises ValueError for anything that is not exactly one ID."""
        found = _TOKEN_RE.findall(text)
        if "".join(f"<{n}_{c}>" for n, c in found) != text.strip() or len(found) != self.depth:
            raise ValueError(f"not a {self.depth}-token semantic ID: {text!r}")
        codes = []
        for level, (name, code) in enumerate(found):
            if name != LEVEL_NAMES[level]:
                raise ValueError(f"token {level} of {text!r} should be level {LEVEL_NAMES[level]!r}")
            # Only the canonical spelling of an in-range code is an ID token: `<a_01>` or a code
            # beyond the level's size would name no token of the vocabulary.
            if int(code) >= self.level_size(level) or code != str(int(code)):
                raise ValueError(f"token {level} of {text!r} is not a valid level-{name} token "
                                 f"(codes 0..{self.level_size(level) - 1})")
            codes.append(int(code))
        return tuple(codes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "token_format": "<{level}_{code}>", "level_names": LEVEL_NAMES[: self.depth]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdFormat:
        return cls(levels=int(data["levels"]), codebook_size=int(data["codebook_size"]),
                   dedup_size=int(data["dedup_size"]))


# --------------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------------


def truncate_history(history: Sequence[str], max_items: int, drop_chunk: int = 10) -> list[str]:
    """Keep at most `max_items` of the newest items, dropping the oldest in whole chunks.

    Dropping one item per new event would change the prompt's first tokens on every request and defeat
    the engine's prefix cache; dropping `drop_chunk` at a time keeps the prefix stable for the next
    `drop_chunk` events.
    """
    if max_items <= 0:
        return []
    excess = len(history) - max_items
    if excess <= 0:
        return list(history)
    chunk = max(1, min(drop_chunk, max_items))
    drop = min(len(history), math.ceil(excess / chunk) * chunk)
    return list(history[drop:])


def history_block(spelled_ids: Sequence[str]) -> str:
    return f"{HISTORY_START}{''.join(spelled_ids)}{HISTORY_END}"


def history_in_prompt(prompt: str, id_format: IdFormat) -> list[str]:
    """The spelled IDs of a prompt's history block, oldest first (what the reasoning may cite)."""
    start, end = prompt.find(HISTORY_START), prompt.find(HISTORY_END)
    if start < 0 or end < start:
        return []
    found = [f"<{n}_{c}>" for n, c in _TOKEN_RE.findall(prompt[start:end])]
    depth = id_format.depth
    return ["".join(found[i:i + depth]) for i in range(0, len(found) - depth + 1, depth)]


def direct_prompt(spelled_history: Sequence[str]) -> str:
    """History -> next item ID (the direct inference mode and the sequential alignment task)."""
    return f"{PREAMBLE}{history_block(spelled_history)}{ANSWER}"


def direct_prompt_split(spelled_history: Sequence[str]) -> tuple[str, str]:
    """`direct_prompt` cut after the first history item: (head, rest) with head + rest equal to it.

    The sequential task trains on `rest` + the target, so one example teaches every next item of the
    history (as SASRec does), not only the last: the history is oldest first and each item in it
    is the "next item" of the ones before it."""
    prompt = direct_prompt(spelled_history)
    cut = len(PREAMBLE) + len(HISTORY_START) + (len(spelled_history[0]) if spelled_history else 0)
    return prompt[:cut], prompt[cut:]


def reasoning_prompt(spelled_history: Sequence[str]) -> str:
    """History -> free-text reasoning, closed by THINK_END, then ANSWER and the item ID."""
    return f"{PREAMBLE}{history_block(spelled_history)}{THINK_START}"


def reasoning_answer_suffix() -> str:
    """What follows the reasoning text before the constrained ID decoding starts."""
    return f"{THINK_END}{ANSWER}"


def item_text(title: str, brand: str = "", categories: str = "", description: str = "",
              max_description_chars: int = 200) -> str:
    parts = [f"Title: {title}"]
    if brand:
        parts.append(f"Brand: {brand}")
    if categories:
        parts.append(f"Categories: {categories}")
    if description:
        parts.append(f"Description: {description[:max_description_chars]}")
    return "; ".join(parts)


def text_to_id_prompt(text: str) -> str:
    """Alignment task: item text -> its ID."""
    return f"Which item is described here? {text}{ANSWER}"


def id_to_title_prompt(spelled_id: str) -> str:
    """Alignment task: item ID -> its title (the answer is free text followed by EOS)."""
    return f"What is the title of item {spelled_id}? Title:"


def titles_history_prompt(titles: Sequence[str]) -> str:
    """Fused alignment task: history given as titles -> next item ID."""
    return f"{PREAMBLE}{HISTORY_START}{' | '.join(titles)}{HISTORY_END}{ANSWER}"


# --------------------------------------------------------------------------------------------------
# Reasoning curriculum (training/curriculum.py): the five stages' section labels and phrasings
# --------------------------------------------------------------------------------------------------

# Stage keys in the order the curriculum introduces them; each stage adds one section to the reasoning.
REASONING_STAGES: tuple[str, ...] = ("evidence", "preference", "intent", "recommendation", "rewrite")
REASONING_LABELS: dict[str, str] = {
    "evidence": "Evidence:",
    "preference": "Preference:",
    "intent": "Intent:",
    "recommendation": "Recommendation:",
    "rewrite": "Denoised history:",
}


def reasoning_section(stage: str, text: str) -> str:
    return f"{REASONING_LABELS[stage]} {text}"


def reasoning_text(sections: Sequence[tuple[str, str]]) -> str:
    """The reasoning body (between THINK_START and THINK_END): one labelled line per stage."""
    return SECTION_SEPARATOR.join(reasoning_section(stage, text) for stage, text in sections)


# Every name the reasoning states (an item's title, a brand, a theme) sits between these markers, so
# the decoder can switch its grounding constraint on inside them (model_store.grounding) and a
# validator can find every claim. Names never contain the markers (`mention_name`).
MENTION_OPEN = "["
MENTION_CLOSE = "]"
SECTION_SEPARATOR = "\n"  # sections are lines; the decoder closes a section at a newline
MENTION_TITLE_WORDS = 6  # a title is named by its first words


def mention_name(text: str, max_words: int | None = None) -> str:
    """The form in which a name is mentioned: markers replaced, whitespace collapsed, optionally cut."""
    words = text.replace(MENTION_OPEN, "(").replace(MENTION_CLOSE, ")").split()
    return " ".join(words[:max_words] if max_words else words)


def mention(name: str) -> str:
    return f"{MENTION_OPEN}{mention_name(name)}{MENTION_CLOSE}"


def evidence_phrase(recent_titles: Sequence[str], brands: Sequence[tuple[str, int]],
                    themes: Sequence[tuple[str, int]]) -> str:
    parts = [f"recent items: {'; '.join(mention(t) for t in recent_titles)}."]
    if brands:
        parts.append("repeated brands: " + ", ".join(f"{mention(b)} ({n})" for b, n in brands) + ".")
    if themes:
        parts.append("repeated themes: " + ", ".join(f"{mention(t)} ({n})" for t, n in themes) + ".")
    return " ".join(parts)


def preference_phrase(theme: str, brand: str | None, loyal: bool) -> str:
    text = f"the user mostly buys {mention(theme)}"
    if brand:
        text += f" and {'sticks to' if loyal else 'has tried'} the brand {mention(brand)}"
    return text + "."


def intent_phrase(theme: str | None, after_theme: str, continues: bool) -> str:
    """`theme` is the next item's theme when the history supports naming it, else None."""
    if theme is None:
        return f"after {mention(after_theme)} the user is likely to move on to a new kind of item."
    if continues:
        return f"after {mention(after_theme)} the user is likely to continue with {mention(theme)}."
    return f"after {mention(after_theme)} the user is likely to move on to {mention(theme)}."


def recommendation_phrase(theme: str | None, brand: str | None) -> str:
    text = f"recommend one item of {mention(theme)}" if theme else "recommend one item of a new kind"
    if brand:
        text += f", preferably by {mention(brand)}"
    return text + "."


# Words of the templates themselves: never taken for a name when they occur outside a mention.
TEMPLATE_WORDS: frozenset[str] = frozenset(
    w.lower() for w in re.findall(r"[A-Za-z][A-Za-z\-]+", " ".join([
        PREAMBLE, *REASONING_LABELS.values(), evidence_phrase(["x"], [("x", 2)], [("x", 2)]),
        preference_phrase("x", "x", True), preference_phrase("x", "x", False), intent_phrase(None, "x", False),
        intent_phrase("x", "x", True), intent_phrase("x", "x", False), recommendation_phrase("x", "x"),
        recommendation_phrase(None, None), "items none"])))


def rewrite_phrase(spelled_ids: Sequence[str]) -> str:
    """The history with off-intent items removed, as IDs, oldest first."""
    return "".join(spelled_ids) if spelled_ids else "none"


def reasoning_completion(reasoning: str, spelled_id: str) -> str:
    """What a reasoning-mode training example completes after `reasoning_prompt`."""
    return f"{reasoning}{reasoning_answer_suffix()}{spelled_id}"


TEACHER_SYSTEM_PROMPT = (
    "You explain purchase decisions for a recommender. Write exactly these labelled lines, one "
    "sentence each: Evidence:, Preference:, Intent:, Recommendation:. Base them on the purchase history. "
    "Write every item title, brand or category you name in square brackets, exactly as the history "
    "spells it, and name nothing the history does not contain. "
    "Never name, quote or identify the hidden next item; describe only the kind of item needed."
)


def teacher_user_prompt(history_titles: Sequence[str], target_title: str, stages: Sequence[str]) -> str:
    """Prompt to an optional teacher LLM (--teacher-url); the next item is given only as a hint."""
    lines = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(history_titles))
    labels = ", ".join(REASONING_LABELS[s] for s in stages)
    return (f"Purchase history, oldest first:\n{lines}\nHidden next item (do not mention it): {target_title}\n"
            f"Write only these lines: {labels}")


PROMPT_SETTINGS: dict[str, Any] = {
    "version": PROMPT_FORMAT_VERSION,
    "preamble": PREAMBLE,
    "special_tokens": list(SPECIAL_TOKENS),
}


def extend_tokenizer(tokenizer: Any, id_format: IdFormat) -> int:
    """Add the special tokens and every ID token to a Hugging Face tokenizer; returns how many were new.

    ID tokens are plain added tokens (kept by `decode`), the markers are special tokens. Resize the
    model's embeddings to `len(tokenizer)` afterwards.
    """
    from tokenizers import AddedToken

    markers = [AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS]
    # replace_extra_special_tokens=False keeps a pretrained tokenizer's own extra special tokens.
    added = tokenizer.add_special_tokens({"additional_special_tokens": markers},
                                         replace_extra_special_tokens=False)
    added += tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                                   for t in id_format.all_tokens()])
    return added


def id_token_ids(tokenizer: Any, id_format: IdFormat) -> list[int]:
    """Token id of every flat code (position i is flat code i); fails if the tokenizer lacks one."""
    ids = tokenizer.convert_tokens_to_ids(id_format.all_tokens())
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(id_format.all_tokens(), ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"tokenizer lacks {len(missing)} ID tokens (e.g. {missing[:3]}); "
                         "run extend_tokenizer first")
    return list(ids)


def reasoning_banned_token_ids(tokenizer: Any, id_format: IdFormat) -> set[int]:
    """Token ids free reasoning text may not contain: every ID token, the markers and the tokenizer's
    special tokens, except THINK_END, which is how reasoning ends."""
    banned = set(id_token_ids(tokenizer, id_format))
    banned.update(int(t) for t in tokenizer.all_special_ids)
    banned.update(int(t) for t in tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if t is not None)
    banned.discard(int(tokenizer.convert_tokens_to_ids(THINK_END)))
    return banned
