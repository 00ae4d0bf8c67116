"""Training examples as (prompt, completion) text pairs, all built from model_store.tokens templates.

The completion of every ID-producing task is the spelled ID followed by EOS; only completion tokens
carry loss. The alignment mix (`alignment_examples`) combines four tasks with configurable weights;
the demo uses the sequential and text -> ID tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_store import tokens
from model_store.bundle import Bundle
from model_store.prior import TransitionPrior
from training.data import next_item_windows


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    task: str
    # The collaborative prior's held-out log-probability of each item ID in the completion, in
    # order (sequential examples, for the SFT trainer's fused objective); empty: plain likelihood.
    item_log_prior: tuple[float, ...] = ()


def spell_history(bundle: Bundle, history: Sequence[str]) -> list[str]:
    return [bundle.spelled_id(bundle.index_of[i]) for i in history if i in bundle.index_of]


def sequential_examples(bundle: Bundle, sequences: dict[str, list[str]], max_history: int = 10,
                        dense: bool = True, prior: TransitionPrior | None = None,
                        windows: str = "prefix") -> list[Example]:
    """History -> next item ID over every training sequence.

    `windows`: "prefix", one example per position (the history before it, up to `max_history` items);
    "sequence", one example per window of `max_history` + 1 items, stepping `max_history`, so that each
    item after a sequence's first is the target of exactly one example, as a sequential model trains
    (needs `dense`). With prefixes the dense loss labels each transition again in every later window,
    3-4 times on amazon-industrial, and most of an epoch's compute goes to that repetition.
    `dense`: the loss also covers the history's own items after the first (each is the next item of
    those before it); measured on amazon-industrial it is what lets a small model learn the item
    transitions in minutes.
    `prior`: each example carries the prior's held-out log-probability of its completion's items
    (TransitionPrior.held_out_log_probs), for the fused objective."""
    if windows not in ("prefix", "sequence"):
        raise ValueError(f"windows must be 'prefix' or 'sequence', got {windows!r}")
    if windows == "sequence" and not dense:
        raise ValueError("windows='sequence' trains every position of a window: it needs dense=True")
    out = []
    for seq in sequences.values():
        seq = [i for i in seq if i in bundle.index_of]
        # held[t - 1]: the prior's log-probability of seq[t] after seq[:t], this user's counts taken out.
        held = prior.held_out_log_probs([bundle.index_of[i] for i in seq]) if prior is not None else None
        if windows == "sequence":
            pairs = [(s + max_history, (seq[s: s + max_history], seq[s + max_history]))
                     if s + max_history < len(seq) else (len(seq) - 1, (seq[s: -1], seq[-1]))
                     for s in range(0, max(1, len(seq) - 1), max_history)]
        else:
            pairs = list(enumerate(next_item_windows(seq, max_history), start=1))
        for t, (history, target) in pairs:
            if not history:
                continue
            spelled, answer = spell_history(bundle, history), bundle.spelled_id(bundle.index_of[target])
            if dense:
                head, rest = tokens.direct_prompt_split(spelled)
                # The completion's items: history[1:] and the target, i.e. positions t - len(history) + 1 .. t.
                logp = tuple(held[t - len(history): t]) if held is not None else ()
                out.append(Example(head, rest + answer, "sequential", logp))
            else:
                logp = (float(held[t - 1]),) if held is not None else ()
                out.append(Example(tokens.direct_prompt(spelled), answer, "sequential", logp))
    return out


def text_to_id_examples(bundle: Bundle) -> list[Example]:
    """Item text -> ID: grounds each ID token in the item's words."""
    return [Example(tokens.text_to_id_prompt(tokens.item_text(it.title, it.brand, it.categories)),
                    bundle.spelled_id(i), "text_to_id") for i, it in enumerate(bundle.items)]


def short_title(title: str, max_words: int = 8) -> str:
    """The first words of a title: keeps prompts short without losing what the item is."""
    words = title.split()
    return " ".join(words[:max_words])


def id_to_title_examples(bundle: Bundle, max_words: int = 12) -> list[Example]:
    """ID -> title: the reverse grounding, so the ID tokens' embeddings carry the item's words."""
    return [Example(tokens.id_to_title_prompt(bundle.spelled_id(i)), " " + short_title(it.title, max_words),
                    "id_to_title") for i, it in enumerate(bundle.items)]


def titles_history_examples(bundle: Bundle, sequences: dict[str, list[str]], max_history: int = 5,
                            max_words: int = 8) -> list[Example]:
    """Fused task: the history given as titles -> next item ID (collaborative signal through text)."""
    out = []
    for seq in sequences.values():
        seq = [i for i in seq if i in bundle.index_of]
        for history, target in next_item_windows(seq, max_history):
            titles = [short_title(bundle.items[bundle.index_of[i]].title, max_words) for i in history]
            out.append(Example(tokens.titles_history_prompt(titles), bundle.spelled_id(bundle.index_of[target]),
                               "titles_history"))
    return out


# Default mixing weights of the alignment tasks: the expected number of times each example of a task
# is used per pass (0.5 = a random half, 2 = every example twice). Sequential recommendation is the
# task the service runs, the others ground the ID tokens in the items' text.
DEFAULT_TASK_WEIGHTS: dict[str, float] = {"sequential": 1.0, "text_to_id": 1.0, "id_to_title": 0.5,
                                          "titles_history": 0.5}


def mix_examples(groups: dict[str, Sequence[Example]], weights: dict[str, float], seed: int = 0
                 ) -> list[Example]:
    """One shuffled list with each task's examples repeated/subsampled by its weight."""
    import random

    rng = random.Random(seed)
    out: list[Example] = []
    for task, examples in groups.items():
        w = float(weights.get(task, 0.0))
        if w <= 0 or not examples:
            continue
        whole, frac = int(w), w - int(w)
        out += list(examples) * whole
        if frac > 0:
            out += rng.sample(list(examples), round(frac * len(examples)))
    rng.shuffle(out)
    return out


def alignment_examples(bundle: Bundle, sequences: dict[str, list[str]], weights: dict[str, float] | None = None,
                       max_history: int = 10, seed: int = 0, dense_history: bool = True,
                       prior: TransitionPrior | None = None, windows: str = "prefix") -> list[Example]:
    """The collaborative-semantic alignment mix: history -> ID, text -> ID, ID -> title, titles -> ID
    (with `prior`, the sequential examples carry its held-out log-probabilities)."""
    weights = {**DEFAULT_TASK_WEIGHTS, **(weights or {})}
    builders = {
        "sequential": lambda: sequential_examples(bundle, sequences, max_history, dense_history, prior, windows),
        "text_to_id": lambda: text_to_id_examples(bundle),
        "id_to_title": lambda: id_to_title_examples(bundle),
        "titles_history": lambda: titles_history_examples(bundle, sequences, min(5, max_history)),
    }
    unknown = set(weights) - set(builders)
    if unknown:
        raise ValueError(f"unknown alignment task(s) {sorted(unknown)}; known: {sorted(builders)}")
    groups = {task: build() for task, build in builders.items() if weights.get(task, 0) > 0}
    return mix_examples(groups, weights, seed)


def holdout_sequences(train: dict[str, list[str]], valid: Sequence[Any]) -> dict[str, list[str]]:
    """Each train sequence cut before its user's first valid-period row, so valid.jsonl stays unseen.

    A valid row (history, target) is located in its user's sequence where the target follows the end
    of the history; sequences with no matching row (e.g. data whose valid targets are not in train)
    are kept whole.
    """
    first: dict[str, int] = {}
    for row in valid:
        seq = train.get(row.user_id)
        if not seq:
            continue
        h = list(row.history)
        for t in range(len(seq)):
            if seq[t] == row.target and t >= len(h) and seq[t - len(h): t] == h:
                first[row.user_id] = min(first.get(row.user_id, t), t)
                break
    return {u: (s[: first[u]] if u in first else s) for u, s in train.items()}
