"""The chain automaton and the validator, without a model: random logits under the automaton's mask
always give a faithful chain; the validator catches each kind of unfaithful one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_store import tokens
from model_store.bundle import Bundle, load_bundle
from model_store.chain_automaton import ChainAutomaton, ChainGrounding, ChainSpec
from model_store.grounding import GroundingIndex, cite_sections, repeated_ngram_rate, validate_chain
from tests.support.bundles import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("grounding") / "b", with_model=False))


@pytest.fixture(scope="module")
def grounding(bundle: Bundle) -> ChainGrounding:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    return ChainGrounding(GroundingIndex(bundle), tok, len(tok))


def decode_random(grounding: ChainGrounding, history: list[int], budget: int, seed: int) -> tuple[list[int], str]:
    rng = np.random.default_rng(seed)
    chain = ChainAutomaton(grounding.vocab, grounding.spec(grounding.index.names_of(history), budget))
    while len(chain.generated) < budget:
        logits = rng.normal(size=grounding.vocab.size)
        logits[~chain.allowed()] = -np.inf
        token = int(np.argmax(logits))
        if token == grounding.vocab.think_end:
            return chain.generated, "end_of_thinking"
        chain.advance(token)
    return chain.generated, "length"


def test_random_logits_under_the_automaton_give_faithful_closed_chains(bundle: Bundle, grounding: ChainGrounding,
                                                                       ) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    rng = np.random.default_rng(0)
    for seed in range(30):
        history = [int(i) for i in rng.choice(len(bundle.items), int(rng.integers(3, 9)), replace=False)]
        generated, finish = decode_random(grounding, history, 200, seed)
        text = tok.decode(generated)
        names = grounding.index.names_of(history)
        assert finish == "end_of_thinking" and len(generated) < 200
        assert validate_chain(text, names, catalog=grounding.index) == [], text
        cited = dict(cite_sections(text, names))
        assert list(cited) == list(tokens.REASONING_STAGES)
        assert set(cited["rewrite"]) <= {bundle.items[i].item_id for i in history} and cited["rewrite"]


def test_a_small_budget_ends_with_length(grounding: ChainGrounding) -> None:
    _, finish = decode_random(grounding, [1, 2, 3], 20, 0)
    assert finish == "length"


def test_spec_round_trips_through_a_dict(grounding: ChainGrounding) -> None:
    spec = grounding.spec(grounding.index.names_of([4, 5, 6]), 64)
    assert ChainSpec.from_dict(spec.to_dict()) == spec


def test_vocab_saves_and_loads(grounding: ChainGrounding, tmp_path: Path) -> None:
    from model_store.chain_automaton import ChainVocab

    grounding.vocab.save(tmp_path / "v.npz")
    loaded = ChainVocab.load(tmp_path / "v.npz")
    assert loaded.headers == grounding.vocab.headers and (loaded.free == grounding.vocab.free).all()


def chain(*bodies: str) -> str:
    return tokens.reasoning_text(list(zip(tokens.REASONING_STAGES, bodies, strict=True)))


def test_validator_accepts_a_template_chain_and_cites_it(bundle: Bundle) -> None:
    index = GroundingIndex(bundle)
    history = index.names_of([0, 5, 10])
    h0, h1 = history[0], history[1]
    text = chain(tokens.evidence_phrase([h0.title, h1.title], [(h0.brand, 2)], []),
                 tokens.preference_phrase(h0.theme, h0.brand, True),
                 tokens.intent_phrase(None, h1.theme, False), tokens.recommendation_phrase(h0.theme, None),
                 tokens.rewrite_phrase([h0.spelled_id, history[2].spelled_id]))
    assert validate_chain(text, history, catalog=index) == []
    cited = dict(cite_sections(text, history))
    assert cited["evidence"][:2] == [h0.item_id, h1.item_id]
    assert cited["rewrite"] == [h0.item_id, history[2].item_id]


@pytest.mark.parametrize("case", ["foreign mention", "unmarked brand", "order", "loop", "short", "foreign id",
                                  "open mention"])
def test_validator_catches_each_failure(bundle: Bundle, case: str) -> None:
    index = GroundingIndex(bundle)
    history = index.names_of([0, 5, 10])  # brands Acme only; themes pipette, glove, clamp
    other = index.items[1]  # Globex beaker
    ok: dict[str, Any] = {"e": f"recent items: [{history[0].title}].", "p": f"the user buys [{history[0].theme}].",
                          "i": "after that the user is likely to move on to a new kind of item.",
                          "r": "recommend one item of a new kind.", "w": history[0].spelled_id}
    if case == "foreign mention":
        ok["p"] = f"the user buys [{other.theme}]."
    elif case == "unmarked brand":
        ok["p"] = f"the user likes {other.brand} a lot."
    elif case == "loop":
        ok["r"] = "of of of of of of of of of"
    elif case == "short":
        ok = {"e": "x.", "p": "y.", "i": "z.", "r": "w.", "w": history[0].spelled_id}
    elif case == "foreign id":
        ok["w"] = other.spelled_id
    elif case == "open mention":
        ok["e"] = f"recent items: [{history[0].title}."
    text = chain(ok["e"], ok["p"], ok["i"], ok["r"], ok["w"])
    if case == "order":
        lines = text.split("\n")
        text = "\n".join([lines[1], lines[0], *lines[2:]])
    assert validate_chain(text, history, catalog=index), text


def test_repeated_ngram_rate() -> None:
    assert repeated_ngram_rate("a b c d e f") == 0.0
    assert repeated_ngram_rate("of of of of of of") == pytest.approx(2 / 3)
