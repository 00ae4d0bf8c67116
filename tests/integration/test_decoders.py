"""The two transformers decoders (cache copied per beam, shared prompt cache) and the scoring rule:
same items in the same order, scores equal to exhaustive teacher-forced scoring of the ID tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_store.bundle import load_bundle
from model_store.model import load_bundle_model
from model_store.tokens import direct_prompt, id_token_ids
from service.engine.hf_decoder import HFTrieDecoder, exhaustive_scores
from service.engine.shared_prefix import SharedPrefixDecoder, make_decoder, supports_shared_prefix


@pytest.fixture(scope="module")
def setup(tiny_bundle_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    bundle = load_bundle(tiny_bundle_dir)
    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    model = load_bundle_model(bundle.model_path)
    ids = id_token_ids(tok, bundle.id_format)
    return bundle, tok, model, ids


def _prompts(bundle, n: int, seed: int) -> list[str]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return [direct_prompt([bundle.spelled_id(int(i)) for i in rng.integers(0, len(bundle.items), int(m))])
            for m in rng.integers(1, 12, n)]


def test_make_decoder_picks_shared_prefix_for_llama(setup) -> None:  # type: ignore[no-untyped-def]
    bundle, tok, model, ids = setup
    assert supports_shared_prefix(model)
    assert isinstance(make_decoder(model, tok, bundle.trie, ids), SharedPrefixDecoder)


def test_decoders_agree_with_filters_and_mixed_widths(setup) -> None:  # type: ignore[no-untyped-def]
    bundle, tok, model, ids = setup
    prompts = _prompts(bundle, 12, seed=3)
    rng = np.random.default_rng(4)
    filters = [bundle.trie.make_filter(exclude=rng.integers(0, 300, 40).tolist()) if i % 3 == 1 else
               bundle.trie.make_filter(allow=rng.integers(0, 300, 25).tolist()) if i % 3 == 2 else None
               for i in range(len(prompts))]
    ks = [10] * len(prompts)
    widths = [10 + 5 * (i % 3) for i in range(len(prompts))]
    copied = HFTrieDecoder(model, tok, bundle.trie, ids).topk(prompts, ks, widths, filters)
    shared = SharedPrefixDecoder(model, tok, bundle.trie, ids).topk(prompts, ks, widths, filters)
    for a, b, flt in zip(copied, shared, filters, strict=True):
        assert [s.index for s in a] == [s.index for s in b]
        assert np.allclose([s.score for s in a], [s.score for s in b], atol=1e-4)
        assert len({s.index for s in b}) == len(b) == 10
        if flt is not None:
            assert all(bool(flt.keep(np.array([bundle.trie.item_path[s.index, -1]]))[0]) for s in b)


def test_batching_does_not_change_results(setup) -> None:  # type: ignore[no-untyped-def]
    bundle, tok, model, ids = setup
    dec = SharedPrefixDecoder(model, tok, bundle.trie, ids)
    prompts = _prompts(bundle, 6, seed=5)
    together = dec.topk(prompts, [10] * 6, [10] * 6)
    alone = [dec.topk([p], [10], [10])[0] for p in prompts]
    assert [[s.index for s in r] for r in together] == [[s.index for s in r] for r in alone]


def test_scores_are_exact_summed_log_probs(setup) -> None:  # type: ignore[no-untyped-def]
    bundle, tok, model, ids = setup
    prompt = _prompts(bundle, 1, seed=7)[0]
    exact = exhaustive_scores(model, tok, prompt, bundle.codes, ids, bundle.id_format)
    # Two prompts, so the shared-prompt path runs (a single prompt takes the plain HF decode steps).
    found = SharedPrefixDecoder(model, tok, bundle.trie, ids).topk([prompt, prompt], [10, 10], [300, 300])[0]
    # With as many beams as items the search is exhaustive: the true top-10, with their exact scores.
    assert [s.index for s in found] == list(np.argsort(-exact, kind="stable")[:10])
    assert np.allclose([s.score for s in found], exact[[s.index for s in found]], atol=1e-4)


@pytest.mark.parametrize("fusion", ["product", "mixture"])
def test_prior_fusion_is_exact(setup, fusion: str) -> None:  # type: ignore[no-untyped-def]
    """Fused scores are exact on both decoders: the summed log-probabilities plus strength * log
    p_prior(item) (product), or log(w p_prior + (1 - w) p_model) (mixture); and the prior moves the
    ranking towards the fixture's i -> i + 1 transitions."""
    from service.engine.beam import request_bias

    bundle, tok, model, ids = setup
    prompt = _prompts(bundle, 1, seed=9)[0]
    history = [40, 41]
    prior = bundle.prior.with_settings(fusion=fusion)
    exact = exhaustive_scores(model, tok, prompt, bundle.codes, ids, bundle.id_format)
    p = prior.item_probs(history)
    w = prior.settings.mixture_weight
    fused = exact + prior.settings.strength * np.log(p) if fusion == "product" else np.log(w * p + (1 - w) * np.exp(exact))
    bias = request_bias(prior, bundle.trie, history)
    for decoder in (HFTrieDecoder, SharedPrefixDecoder):
        found = decoder(model, tok, bundle.trie, ids).topk([prompt, prompt], [10, 10], [300, 300],
                                                           biases=[bias, None])
        assert [s.index for s in found[0]] == list(np.argsort(-fused, kind="stable")[:10])
        assert np.allclose([s.score for s in found[0]], fused[[s.index for s in found[0]]], atol=1e-4)
        assert [s.index for s in found[1]] == list(np.argsort(-exact, kind="stable")[:10])
    assert found[0][0].index == 42


def test_shared_prefix_is_exact_for_qwen2_with_biases(setup) -> None:  # type: ignore[no-untyped-def]
    """Qwen2 has q/k/v biases and grouped-query attention: the stacked projections must keep both, and
    the model's own forward must still give the same numbers after its weights are rebound."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    bundle, tok, _, ids = setup
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random, non-zero biases, so dropping one would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    prompt = _prompts(bundle, 1, seed=11)[0]
    exact = exhaustive_scores(model, tok, prompt, bundle.codes, ids, bundle.id_format)
    found = SharedPrefixDecoder(model, tok, bundle.trie, ids).topk([prompt], [10], [300])[0]
    assert [s.index for s in found] == list(np.argsort(-exact, kind="stable")[:10])
    assert np.allclose([s.score for s in found], exact[[s.index for s in found]], atol=1e-4)
    # The HF forward, now on the rebound (stacked) weights, still scores the same.
    assert np.allclose(exhaustive_scores(model, tok, prompt, bundle.codes, ids, bundle.id_format), exact, atol=1e-5)


def test_static_prefix_cache_is_exact_and_follows_weight_updates(setup) -> None:  # type: ignore[no-untyped-def]
    """The preamble's keys/values are computed once and the projections packed for oneDNN: results
    equal the plain decoder, and an in-place weight update (training) refreshes both."""
    import torch

    bundle, tok, model, ids = setup
    prompts = _prompts(bundle, 5, seed=13)
    cached = SharedPrefixDecoder(model, tok, bundle.trie, ids)
    plain = SharedPrefixDecoder(model, tok, bundle.trie, ids, static_prefix=None, packed_weights=False)
    assert cached._split_static(prompts, None)[1] and not plain._split_static(prompts, None)[1]
    for batch in (prompts, prompts[:1]):
        a = cached.topk(batch, [10] * len(batch), [10] * len(batch))
        b = plain.topk(batch, [10] * len(batch), [10] * len(batch))
        assert [[s.index for s in r] for r in a] == [[s.index for s in r] for r in b]
        assert np.allclose([s.score for r in a for s in r], [s.score for r in b for s in r], atol=1e-4)
    before = cached.static_kv()[0][0].clone()
    weights = [model.get_input_embeddings().weight, model.model.layers[0].mlp.up_proj.weight]
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w in weights:
                w.mul_(1.5)
        after = cached.topk(prompts, [10] * 5, [10] * 5)
        assert not torch.allclose(cached.static_kv()[0][0], before)
        # A decoder built now (plain F.linear, no cache) scores with the updated weights too.
        fresh = SharedPrefixDecoder(model, tok, bundle.trie, ids, static_prefix=None, packed_weights=False)
        b = fresh.topk(prompts, [10] * 5, [10] * 5)
        assert np.allclose([s.score for r in after for s in r], [s.score for r in b for s in r], atol=1e-4)
    finally:
        with torch.no_grad():
            for w, v in zip(weights, saved, strict=True):
                w.copy_(v)
