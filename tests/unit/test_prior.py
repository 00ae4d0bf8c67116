"""The collaborative prior (model_store.prior): counting, a proper distribution with a floor, trie node
biases that telescope to the item's prior, persistence in bundles, fusion in the shared beam search."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model_store.bundle import BundleError, load_bundle, save_bundle
from model_store.prior import HISTORY_SPAN, PriorSettings, TransitionPrior
from service.engine.beam import StackedFusion, TrieBeamSearch, request_bias, stack_biases
from tests.support.bundles import make_tiny_bundle

SEQS = [[0, 1, 2], [0, 1, 3], [1, 2, 4], [3, 4]]


def test_fit_counts_transitions_and_popularity() -> None:
    prior = TransitionPrior.fit(SEQS, num_items=6)
    assert prior.p1[0].toarray().ravel().tolist() == [0, 1, 0, 0, 0, 0]
    np.testing.assert_allclose(prior.p1[1].toarray().ravel(), [0, 0, 2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(prior.p_skip[0].toarray().ravel(), [0, 0, 0.5, 0.5, 0, 0])
    np.testing.assert_allclose(prior.popularity, np.array([2, 3, 2, 2, 2, 0]) / 11)


@pytest.mark.parametrize("normalise", [True, False])
def test_scores_mix_last_skip_and_two_step(normalise: bool) -> None:
    settings = PriorSettings(weights=(1.0, 0.5, 0.25), popularity_weight=0.0, normalise_rows=normalise)
    prior = TransitionPrior.fit(SEQS, 6, settings)
    s = prior.scores([0, 1])
    first, skip_m = (prior.p1, prior.p_skip) if normalise else (prior.c1, prior.c_skip)
    last = first[1].toarray().ravel()
    two = (first[1] @ prior.p1).toarray().ravel()
    skip = skip_m[0].toarray().ravel()
    np.testing.assert_allclose(s, last + 0.5 * skip + 0.25 * two)
    assert prior.scores([]).sum() == 0  # no history, no popularity weight: nothing to say


@pytest.mark.parametrize("normalise", [True, False])
def test_history_term_adds_the_earlier_items_next_counts(normalise: bool) -> None:
    prior = TransitionPrior.fit(SEQS, 6, PriorSettings(weights=(1.0, 0.5, 0.0), popularity_weight=0.0,
                                                       normalise_rows=normalise))
    deep = prior.with_settings(history_weight=0.5, history_decay=0.25)
    first = prior.p1 if normalise else prior.c1
    history = [3, 0, 1]  # before the last item 1: item 0 one place back, item 3 two places back
    expected = prior.scores(history) + 0.5 * first[0].toarray().ravel() + 0.5 * 0.25 * first[3].toarray().ravel()
    np.testing.assert_allclose(deep.scores(history), expected)
    assert deep.scores(history)[4] > prior.scores(history)[4]  # 3 -> 4, two places back, now counts
    np.testing.assert_allclose(deep.scores([1]), prior.scores([1]))  # nothing before the last item


def test_history_term_reads_the_latest_history_span_items() -> None:
    prior = TransitionPrior.fit(SEQS, 6, PriorSettings(popularity_weight=0.0, history_weight=1.0, history_decay=1.0))
    inside, beyond = [0] + [5] * (HISTORY_SPAN - 1), [0] + [5] * HISTORY_SPAN  # item 5 follows nothing
    assert prior.scores(inside)[1] > 0  # 0 -> 1, the oldest item of the span
    assert prior.scores(beyond)[1] == 0


def test_settings_round_trip_and_old_manifests_have_no_history_term() -> None:
    settings = PriorSettings(history_weight=0.5, history_decay=0.8)
    assert PriorSettings.from_dict(settings.to_dict()) == settings
    old = {k: v for k, v in PriorSettings().to_dict().items() if not k.startswith("history_")}
    assert PriorSettings.from_dict(old).history_weight == 0.0
    with pytest.raises(ValueError, match="history_decay"):
        PriorSettings(history_decay=1.5)


def test_counts_let_the_better_attested_transition_win() -> None:
    # After 1 came 2 once; 0 was followed two later by 3 three times. For the history [0, 1] the
    # probabilities say P(2 | 1) = 1 against P(3 two after 0) = 1 at half weight; the counts say 1
    # against 3 at half weight.
    seqs = [[5, 1, 2], [0, 9, 3], [0, 9, 3], [0, 9, 3]]
    settings = PriorSettings(weights=(1.0, 0.5, 0.0), popularity_weight=0.0)
    counts = TransitionPrior.fit(seqs, 10, replace(settings, normalise_rows=False))
    probs = counts.with_settings(normalise_rows=True)
    assert counts.c1[1].toarray().ravel()[2] == 1 and counts.c_skip[0].toarray().ravel()[3] == 3
    assert int(probs.scores([0, 1]).argmax()) == 2
    assert int(counts.scores([0, 1]).argmax()) == 3


def test_priors_saved_as_probabilities_still_load(tmp_path: Path) -> None:
    """Bundles written before counts were kept hold P(next | item) only, under p1 / p_skip."""
    prior = TransitionPrior.fit(SEQS, 6, PriorSettings(normalise_rows=True))
    arrays: dict[str, Any] = {"popularity": prior.popularity}
    for name, m in (("p1", prior.p1), ("p_skip", prior.p_skip)):
        arrays |= {f"{name}_data": m.data, f"{name}_indices": m.indices, f"{name}_indptr": m.indptr}
    np.savez(tmp_path / "old.npz", **arrays)
    settings = PriorSettings.from_dict({"weights": [1.0, 0.5, 0.1]})  # an old manifest: no normalise_rows
    assert settings.normalise_rows
    old = TransitionPrior.load(tmp_path / "old.npz", settings)
    np.testing.assert_allclose(old.scores([0, 1]), prior.scores([0, 1]))
    with pytest.raises(ValueError, match="probabilities only"):
        TransitionPrior.load(tmp_path / "old.npz", replace(settings, normalise_rows=False))


def test_saved_counts_round_trip(tmp_path: Path) -> None:
    prior = TransitionPrior.fit(SEQS, 6)
    prior.save(tmp_path / "p.npz")
    back = TransitionPrior.load(tmp_path / "p.npz", prior.settings)
    assert (back.c1 != prior.c1).nnz == 0 and (back.c_skip != prior.c_skip).nnz == 0
    np.testing.assert_allclose(back.scores([0, 1]), prior.scores([0, 1]))


def test_item_probs_is_a_distribution_with_a_floor() -> None:
    prior = TransitionPrior.fit(SEQS, 6, PriorSettings(floor=0.1))
    p = prior.item_probs([0])
    assert p.sum() == pytest.approx(1.0)
    assert p[5] == pytest.approx(0.1 / 6), "an item never seen in training keeps the uniform floor"
    assert p.argmax() == 1
    np.testing.assert_allclose(prior.item_probs([99]), prior.item_probs([]))  # unknown indices are ignored


def test_node_bias_telescopes_to_the_item_prior(tmp_path: Path) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", n_items=60, with_model=False))
    prior = bundle.prior
    assert prior is not None and prior.num_items == 60
    prior = prior.with_settings(strength=0.7)
    bias = prior.node_bias([3, 4], bundle.trie)
    p = prior.item_probs([3, 4])
    assert bias[0] == 0.0
    np.testing.assert_allclose(bias[bundle.trie.item_path[:, -1]], 0.7 * np.log(p))
    # An inner node's mass is the sum of its items' probabilities.
    first = bundle.trie.item_path[:, 0]
    node = first[0]
    assert np.exp(bias[node] / 0.7) == pytest.approx(p[first == node].sum())


def test_bundle_round_trip_and_add_items(tmp_path: Path) -> None:
    path = make_tiny_bundle(tmp_path / "b", n_items=40, with_model=False)
    bundle = load_bundle(path)
    assert bundle.manifest["prior"] == PriorSettings().to_dict()
    assert bundle.prior is not None
    assert int(bundle.prior.p1[5].toarray().argmax()) == 6  # the fixture's i -> i + 1 transitions

    grown = bundle.prior.extended(45)
    assert grown.num_items == 45 and grown.p1.shape == (45, 45)
    assert grown.item_probs([44]).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shrink"):
        bundle.prior.extended(10)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    wrong = TransitionPrior.fit([[0, 1]], 7)
    with pytest.raises(BundleError, match="prior covers 7 items"):
        save_bundle(tmp_path / "bad", items=bundle.items, codes=bundle.codes, codebooks=bundle.codebooks,
                    id_format=bundle.id_format, tokenizer=tok, prior=wrong)
    plain = load_bundle(make_tiny_bundle(tmp_path / "p", n_items=40, with_model=False, with_prior=False))
    assert plain.prior is None and plain.manifest["prior"] is None


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="3 numbers"):
        PriorSettings.from_dict({"weights": [1, 2]})
    with pytest.raises(ValueError, match="floor"):
        PriorSettings.from_dict({"floor": 0})
    with pytest.raises(ValueError, match="strength"):
        PriorSettings.from_dict({"strength": -1})
    with pytest.raises(ValueError, match="fusion"):
        PriorSettings.from_dict({"fusion": "sum"})
    with pytest.raises(ValueError, match="mixture_weight"):
        PriorSettings.from_dict({"fusion": "mixture", "mixture_weight": 1.0})
    s = PriorSettings.from_dict({"weights": [1, 0.1, 0], "strength": 2, "enabled": True})
    assert PriorSettings.from_dict(s.to_dict()) == s
    m = PriorSettings(fusion="mixture", mixture_weight=0.7)
    assert PriorSettings.from_dict(m.to_dict()) == m
    # Manifests written before mixture fusion existed name no fusion: they keep decoding as products.
    assert s.fusion == "product" and PriorSettings().fusion == "mixture"


def _flat_beam_search(bundle: Any, prior: TransitionPrior, history: list[int]) -> tuple[list[Any], list[Any], float]:
    """Fused and plain top-5 of a beam search whose model gives every token the same log-probability."""
    trie = bundle.trie
    vocab = bundle.id_format.vocab_size
    search = TrieBeamSearch(trie, list(range(vocab)))  # code == vocabulary id for this check
    biases = stack_biases([request_bias(prior, trie, history), None], trie.num_nodes)
    state = search.start(2)
    for _ in range(trie.depth):
        flat = torch.full((state.size, vocab), -np.log(vocab))
        state = search.advance(state, flat, [80, 80], [None, None], biases).state
    fused, plain = search.finish(state, 2, [5, 5])
    return fused, plain, trie.depth * -np.log(vocab)


def test_beam_search_fuses_the_prior_as_a_product(tmp_path: Path) -> None:
    """With flat model log-probabilities, the fused beam ranks items exactly by the prior."""
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", n_items=80, with_model=False))
    prior = bundle.prior.with_settings(fusion="product")
    history = [10, 11]
    fused, plain, model = _flat_beam_search(bundle, prior, history)
    p = prior.item_probs(history)
    assert [s.index for s in fused][:2] == [12, 13]  # next after 11, then the skip/two-step item
    strength = prior.settings.strength
    np.testing.assert_allclose([s.score for s in fused], [model + strength * np.log(p[s.index]) for s in fused])
    assert len({s.score for s in plain}) == 1  # the second prompt had no prior: all ties
    assert request_bias(None, bundle.trie, history) is None and request_bias(prior, bundle.trie, None) is None


def test_beam_search_fuses_the_prior_as_a_mixture(tmp_path: Path) -> None:
    """Mixture fusion scores each item log(w p_prior + (1 - w) p_model), prefixes by their mass."""
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", n_items=80, with_model=False))
    prior = bundle.prior.with_settings(fusion="mixture", mixture_weight=0.6)
    history = [10, 11]
    fused, plain, model = _flat_beam_search(bundle, prior, history)
    p = prior.item_probs(history)
    assert [s.index for s in fused][:2] == [12, 13]
    np.testing.assert_allclose([s.score for s in fused],
                               [np.log(0.6 * p[s.index] + 0.4 * np.exp(model)) for s in fused])
    np.testing.assert_allclose([s.score for s in plain], model)  # no prior: the model's own score
    with pytest.raises(ValueError, match="mix product and mixture"):
        stack_biases([request_bias(prior, bundle.trie, history),
                      request_bias(prior.with_settings(fusion="product"), bundle.trie, history)], bundle.trie.num_nodes)


def test_mixture_lets_the_model_rank_what_the_prior_does_not_know() -> None:
    """Unlike the product, the mixture keeps the prior's confident item on top while the model, not
    the prior's uniform floor, orders the items without transitions."""
    term = np.log(0.8) + np.log(np.array([1.0, 0.9, 0.001, 0.001]))  # root, a known item, two unknown ones
    fused = StackedFusion(term[None, :], np.array([np.log(0.2)]))
    scores = fused.score(np.zeros(3, dtype=np.int64), np.array([1, 2, 3]), np.log(np.array([0.01, 0.3, 0.02])))
    assert scores[0] > scores[1] > scores[2]


def test_excluded_items_add_no_mass(tmp_path: Path) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", n_items=60, with_model=False))
    trie, prior = bundle.trie, bundle.prior
    full = prior.node_bias([3, 4], trie)
    excl = prior.node_bias([3, 4], trie, exclude=[5, 6])
    leaves = trie.item_path[:, -1]
    assert np.isneginf(excl[leaves[[5, 6]]]).all()
    others = np.setdiff1d(np.arange(60), [5, 6])
    np.testing.assert_allclose(excl[leaves[others]], full[leaves[others]])  # leaves keep strength * log p
    parent = trie.item_path[5, -2]
    assert excl[parent] < full[parent], "the parent of an excluded item loses that item's mass"
    allowed = prior.node_bias([3, 4], trie, allow=[10, 11])
    assert np.isfinite(allowed[leaves[[10, 11]]]).all() and np.isneginf(np.delete(allowed[leaves], [10, 11])).all()
    assert not np.isnan(excl).any() and not np.isnan(allowed).any()
    assert not prior.with_settings(strength=0.0).node_bias([3], trie, exclude=[5]).any()


def test_settings_are_validated_on_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="floor"):
        PriorSettings(floor=0.0)
    prior = TransitionPrior.fit(SEQS, 6)
    with pytest.raises(ValueError, match="strength"):
        prior.with_settings(strength=-0.5)
    path = make_tiny_bundle(tmp_path / "b", n_items=30, with_model=False)
    (path / "prior.npz").unlink()
    with pytest.raises(BundleError, match="prior.npz is missing"):
        load_bundle(path, verify=False)


def test_configs_take_todays_defaults_and_old_manifests_their_own() -> None:
    assert PriorSettings.from_config({"enabled": True, "floor": 0.05}) == PriorSettings(floor=0.05)
    old = PriorSettings.from_dict({"floor": 0.05})  # a manifest written before mixture and counts
    assert old.fusion == "product" and old.normalise_rows
