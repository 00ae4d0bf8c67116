"""Training examples as (prompt, completion) text pairs, all built from model_store.tokens templates.

The completion of every ID-producing task is the spelled ID followed by EOS; only completion tokens
carry loss. The full GREAM recipe adds more task kinds here; the demo uses the sequential task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_store import tokens
from model_store.bundle import Bundle
from training.data import next_item_windows


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    task: str


def spell_history(bundle: Bundle, history: Sequence[str]) -> list[str]:
    return [bundle.spelled_id(bundle.index_of[i]) for i in history if i in bundle.index_of]


def sequential_examples(bundle: Bundle, sequences: dict[str, list[str]], max_history: int = 10
                        ) -> list[Example]:
    """History -> next item ID, one example per position of every training sequence."""
    out = []
    for seq in sequences.values():
        seq = [i for i in seq if i in bundle.index_of]
        for history, target in next_item_windows(seq, max_history):
            out.append(Example(tokens.direct_prompt(spell_history(bundle, history)),
                               bundle.spelled_id(bundle.index_of[target]), "sequential"))
    return out


def text_to_id_examples(bundle: Bundle) -> list[Example]:
    """Item text -> ID: grounds each ID token in the item's words."""
    return [Example(tokens.text_to_id_prompt(tokens.item_text(it.title, it.brand, it.categories)),
                    bundle.spelled_id(i), "text_to_id") for i, it in enumerate(bundle.items)]
