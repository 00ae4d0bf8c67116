"""The reasoning curriculum: five stages, the target never in the reasoning, denoised subsequences."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from model_store import tokens
from training.curriculum import (
    CurriculumConfig,
    ThemeIndex,
    build_sections,
    curriculum_examples,
    denoised_subsequence,
    describe,
)


@pytest.fixture(scope="module")
def bundle_and_sequences(tmp_path_factory: pytest.TempPathFactory):
    from model_store.bundle import load_bundle
    from tests.support.bundles import make_tiny_bundle

    bundle = load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("cur") / "b", n_items=150, with_model=False))
    rng = np.random.default_rng(0)
    ids = [it.item_id for it in bundle.items]
    # Sequences with structure (runs inside one kind) and repeats, so every branch is exercised.
    seqs = {}
    for u in range(60):
        kind = int(rng.integers(8))
        seq = [ids[(kind + 8 * int(rng.integers(18))) % 150] for _ in range(int(rng.integers(4, 12)))]
        seq[int(rng.integers(len(seq)))] = ids[int(rng.integers(150))]
        seqs[f"u{u}"] = seq
    return bundle, seqs


@pytest.mark.parametrize("no_categories", [False, True])
def test_five_stages_target_never_in_reasoning(bundle_and_sequences, no_categories: bool) -> None:
    bundle, seqs = bundle_and_sequences
    if no_categories:  # themes then come from first-code clusters and title words
        bundle = dataclasses.replace(bundle, items=[dataclasses.replace(it, categories="") for it in bundle.items])
    examples = curriculum_examples(bundle, seqs, stages=5)
    assert len(examples) > 50
    labels = [tokens.REASONING_LABELS[s] for s in tokens.REASONING_STAGES]
    for ex in examples:
        parts = describe(ex)
        reasoning, answer = parts["reasoning"], parts["answer"]
        assert ex.prompt.endswith(tokens.THINK_START)
        target = bundle.trie.item_at(bundle.id_format.parse(answer))
        assert target is not None
        assert bundle.spelled_id(target) not in reasoning
        assert bundle.items[target].title not in reasoning
        lines = reasoning.split("\n")
        assert [line.split(" ")[0] + (" " + line.split(" ")[1] if line.startswith("Denoised") else "")
                for line in lines] == labels


def test_stages_are_introduced_one_by_one(bundle_and_sequences) -> None:
    bundle, seqs = bundle_and_sequences
    for s in range(1, 6):
        ex = curriculum_examples(bundle, seqs, stages=s)[0]
        reasoning = describe(ex)["reasoning"]
        assert len(reasoning.split("\n")) == s
        assert all(tokens.REASONING_LABELS[st] in reasoning for st in tokens.REASONING_STAGES[:s])
        assert not any(tokens.REASONING_LABELS[st] in reasoning for st in tokens.REASONING_STAGES[s:])


def test_denoised_rewrite_is_subsequence_of_history(bundle_and_sequences) -> None:
    bundle, seqs = bundle_and_sequences
    themes = ThemeIndex(bundle, seqs)
    cfg = CurriculumConfig()
    checked = removed = 0
    for seq in seqs.values():
        idx = [bundle.index_of[i] for i in seq]
        for t in range(1, len(idx)):
            history, target = idx[max(0, t - 10): t], idx[t]
            sections = build_sections(themes, history, target, cfg)
            if sections is None:
                assert target in history or not history
                continue
            kept = denoised_subsequence(bundle, sections)
            it = iter(history)
            assert kept and all(k in it for k in kept)  # order-preserving subsequence
            checked += 1
            removed += len(kept) < len(history)
    assert checked > 50 and removed > 0  # some off-intent items really are removed


def test_teacher_failure_falls_back_to_templates(bundle_and_sequences, tmp_path: Path) -> None:
    import httpx

    from training.curriculum import TeacherClient

    bundle, seqs = bundle_and_sequences
    teacher = TeacherClient("http://teacher.invalid/v1", timeout=0.5)
    # An endpoint that fails every request, without a socket.
    teacher.client = httpx.Client(base_url="http://teacher.invalid/v1",
                                  transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    few = dict(list(seqs.items())[:3])
    examples = curriculum_examples(bundle, few, stages=4, teacher=teacher)
    assert examples and teacher.failures == len(examples)
    assert all("Evidence:" in e.completion for e in examples)


def test_dense_sequential_examples_teach_every_history_item(bundle_and_sequences) -> None:
    from training.tasks import sequential_examples

    bundle, seqs = bundle_and_sequences
    dense = sequential_examples(bundle, seqs, max_history=10, dense=True)
    plain = sequential_examples(bundle, seqs, max_history=10, dense=False)
    assert len(dense) == len(plain) > 0
    for d, p in zip(dense, plain, strict=True):
        # The same text; the loss starts after the first history item instead of after the prompt.
        assert d.prompt + d.completion == p.prompt + p.completion
        assert d.prompt.startswith(tokens.PREAMBLE + tokens.HISTORY_START)
        assert bundle.id_format.parse(d.prompt[len(tokens.PREAMBLE) + len(tokens.HISTORY_START):])
        assert d.completion.endswith(p.completion) and len(d.completion) > len(p.completion)


def test_sequence_windows_label_each_transition_once(bundle_and_sequences) -> None:

    from training.tasks import sequential_examples

    bundle, seqs = bundle_and_sequences
    windows = sequential_examples(bundle, seqs, max_history=4, windows="sequence")
    prefixes = sequential_examples(bundle, seqs, max_history=4, windows="prefix")

    def labelled(examples) -> int:  # items whose ID tokens carry loss (one level-0 token per item)
        return sum(e.completion.count(bundle.id_format.token(0, 0)[:3]) for e in examples)

    # Every item after a sequence's first is a target exactly once: the sum of (length - 1).
    assert labelled(windows) == sum(len(s) - 1 for s in seqs.values() if len(s) > 1)
    assert len(windows) < len(prefixes)
    assert labelled(prefixes) > 2 * labelled(windows)  # prefixes label most transitions again and again
    with pytest.raises(ValueError, match="dense"):
        sequential_examples(bundle, seqs, windows="sequence", dense=False)


@pytest.mark.parametrize("no_categories", [False, True])
def test_template_chains_pass_the_validator(bundle_and_sequences, no_categories: bool) -> None:
    from model_store.grounding import validate_chain

    bundle, seqs = bundle_and_sequences
    if no_categories:
        bundle = dataclasses.replace(bundle, items=[dataclasses.replace(it, categories="") for it in bundle.items])
    themes = ThemeIndex(bundle, seqs)
    built = skipped = 0
    for seq in seqs.values():
        idx = [bundle.index_of[i] for i in seq]
        for t in range(1, len(idx)):
            history, target = idx[max(0, t - 10): t], idx[t]
            sections = build_sections(themes, history, target, CurriculumConfig())
            if sections is None:
                skipped += target not in history
                continue
            built += 1
            text = tokens.reasoning_text(sections)
            assert validate_chain(text, themes.names.names_of(history), catalog=themes.names) == [], text
    assert built > 50 and skipped <= 0.05 * built  # the validator rarely costs a window


def test_teacher_text_that_fails_the_validator_is_replaced(bundle_and_sequences) -> None:
    import json

    import httpx

    from training.curriculum import TeacherClient

    bundle, seqs = bundle_and_sequences
    answer = ("Evidence: the user bought [Nonexistent Brand] things.\n"
              "Preference: the user likes Globex gear a lot.\n"
              "Intent: more of the same kind of gear.\nRecommendation: one more thing.")
    body = json.dumps({"choices": [{"message": {"content": answer}}]})
    teacher = TeacherClient("http://teacher.invalid/v1")
    teacher.client = httpx.Client(base_url="http://teacher.invalid/v1", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, content=body, headers={"content-type": "application/json"})))
    examples = curriculum_examples(bundle, dict(list(seqs.items())[:3]), stages=4, teacher=teacher)
    assert examples and teacher.rejected == len(examples)
    assert not any("Nonexistent" in e.completion for e in examples)
