"""SRPO pieces: prefix rewards, group and pass@k advantages, the clipped loss, constrained sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.srpo import (
    ConstrainedSampler,
    group_advantages,
    pass_at_k,
    passk_advantage,
    policy_loss,
    prefix_reward,
)


def test_prefix_reward_levels() -> None:
    target = (3, 1, 4, 1)
    assert prefix_reward((3, 1, 4, 1), target) == 1.0
    assert prefix_reward((3, 1, 4, 0), target) == pytest.approx(0.866, abs=1e-3)
    assert prefix_reward((3, 1, 0, 1), target) == pytest.approx(0.707, abs=1e-3)
    assert prefix_reward((3, 0, 4, 1), target) == pytest.approx(0.5)
    assert prefix_reward((0, 1, 4, 1), target) == 0.0  # credit only for a matched *prefix*


def test_pass_at_k() -> None:
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 8, 4) == 1.0
    assert pass_at_k(8, 1, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(8, 4)) == pytest.approx(0.5)
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)


def test_passk_advantage_values_and_zero_mean() -> None:
    adv = passk_advantage([1.0, 0, 0, 0, 0, 0, 0, 0.5], k=4)
    # rho = 0.5, sigma = 0.5: a hit gets (1 - rho) / sigma = 1, a miss (1 - rho - C(6,3)/C(7,3)) / sigma.
    assert adv[0] == pytest.approx(1.0, abs=1e-5)
    assert adv[1] == pytest.approx((0.5 - 20 / 35) / 0.5, abs=1e-5)
    assert adv[7] == adv[1]  # partial credit is not a hit for the pass@k term
    for c in range(1, 8):
        r = [1.0] * c + [0.0] * (8 - c)
        assert passk_advantage(r, 4).sum() == pytest.approx(0.0, abs=1e-4)
    assert np.allclose(passk_advantage([0.0] * 8, 4), 0) and np.allclose(passk_advantage([1.0] * 8, 4), 0)


def test_group_advantages() -> None:
    rewards = np.array([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    plain = group_advantages(rewards, k=2, passk_weight=0.0)
    assert np.allclose(plain[0], 0)
    std = np.std([1.0, 0, 0, 0], ddof=1)
    assert plain[1] == pytest.approx((np.array([1.0, 0, 0, 0]) - 0.25) / std, abs=1e-5)
    both = group_advantages(rewards, k=2, passk_weight=1.0)
    assert both[1] == pytest.approx(plain[1] + passk_advantage(rewards[1], 2), abs=1e-6)
    assert np.allclose(both[0], 0)


def test_policy_loss_on_policy_is_minus_mean_advantage() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, extra = policy_loss(logp, logp, logp, mask, adv, clip_eps=0.2, kl_coef=0.1)
    assert float(loss) == pytest.approx(-(2.0 - 1.0) / 2)
    assert extra["kl"] == pytest.approx(0.0) and extra["clip_frac"] == 0.0
    # Raising a positive-advantage token's probability lowers the loss, up to the clip.
    logp_new = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp_new, logp, logp, mask, adv, 0.2, 0.0)
    loss.backward()
    assert logp_new.grad[0, 0] < 0 and logp_new.grad[1, 0] > 0


@pytest.mark.slow
def test_constrained_sampler_yields_only_catalog_ids(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_store import tokens
    from model_store.bundle import load_bundle
    from tests.support.bundles import make_tiny_bundle

    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", n_items=120))
    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    model = AutoModelForCausalLM.from_pretrained(str(bundle.model_path))
    code_ids = tokens.id_token_ids(tok, bundle.id_format)
    sampler = ConstrainedSampler(model, bundle.trie, code_ids, tok.pad_token_id)
    prompts = [tokens.direct_prompt([bundle.spelled_id(i) for i in h]) for h in ([1, 2, 3], [7], [4, 5])]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    s = sampler.sample(ids, group=32, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert s.codes.shape == (96, bundle.id_format.depth)
    assert list(s.prompt) == [0] * 32 + [1] * 32 + [2] * 32
    for codes, toks, item in zip(s.codes, s.token_ids, s.items, strict=True):
        assert bundle.trie.item_at(codes) == item >= 0
        assert np.array_equal(bundle.codes[item], codes)
        assert list(toks) == [code_ids[bundle.id_format.flat_code(lv, c)] for lv, c in enumerate(codes)]
    assert len(set(s.items.tolist())) > 5  # it samples, it does not decode greedily
