"""The SFT trainer's fused objective: held-out prior probabilities, where each item's ID tokens sit in
a batch, and the mixture likelihood the loss computes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import tokens
from model_store.bundle import load_bundle
from model_store.prior import PriorSettings, TransitionPrior
from tests.support.bundles import make_tiny_bundle
from training.sft import IGNORE, FusedObjective, _collate, fused_loss, tokenize_examples
from training.tasks import sequential_examples

SEQS = [[0, 1, 2], [0, 1, 3], [1, 2, 4], [3, 4], [0, 2, 4]]


@pytest.mark.parametrize("normalise,history_weight", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)])
def test_held_out_log_probs_are_the_prior_without_that_sequence(normalise: bool, history_weight: float) -> None:
    # No popularity and no two-step term: those keep the user's counts (see the docstring).
    settings = PriorSettings(weights=(1.0, 0.5, 0.0), popularity_weight=0.0, floor=0.05, normalise_rows=normalise,
                             history_weight=history_weight)
    user = [0, 1, 2, 4]
    everyone = TransitionPrior.fit([*SEQS, user], 6, settings)
    others = TransitionPrior.fit(SEQS, 6, settings)
    held = everyone.held_out_log_probs(user)
    expected = [math.log(others.item_probs(user[:t])[user[t]]) for t in range(1, len(user))]
    np.testing.assert_allclose(held, expected)
    # Counted in, the same transitions look more certain than they would for a new user.
    counted = [math.log(everyone.item_probs(user[:t])[user[t]]) for t in range(1, len(user))]
    assert all(c >= h for c, h in zip(counted, held, strict=True)) and sum(counted) > sum(held)


def test_a_transition_only_this_user_made_falls_to_the_floor() -> None:
    settings = PriorSettings(weights=(1.0, 0.0, 0.0), popularity_weight=0.0, floor=0.1)
    prior = TransitionPrior.fit([*SEQS, [5, 3]], 6, settings)
    assert prior.held_out_log_probs([5, 3])[0] == pytest.approx(math.log(1 / 6))  # nothing left: uniform


def test_fused_loss_is_the_mixture_likelihood_per_item() -> None:
    torch.manual_seed(0)
    vocab, width = 7, 6
    logits = torch.randn(1, width, vocab, requires_grad=True)
    labels = torch.full((1, width), IGNORE)
    labels[0, 2:] = torch.tensor([3, 4, 5, 6])  # tokens 2, 3 form one item; 4 and 5 are plain
    group = torch.full((1, width), -1)
    group[0, 2:4] = 0
    log_prior = torch.tensor([math.log(0.3)])
    w = 0.8
    loss = fused_loss(logits, labels, group, log_prior, w)
    lp = torch.log_softmax(logits[0, :-1].detach(), -1)
    token = [lp[p - 1, labels[0, p]].item() for p in range(2, width)]  # position p is predicted at p - 1
    m = math.exp(token[0] + token[1])
    expected = (-math.log(w * 0.3 + (1 - w) * m) - token[2] - token[3]) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Its gradient is the plain one scaled by the model's share of the mixture.
    loss.backward()
    assert logits.grad is not None
    plain = logits.detach().clone().requires_grad_(True)
    item_lp = torch.log_softmax(plain[0, :-1], -1)
    (-(item_lp[1, 3] + item_lp[2, 4]) / 4).backward()
    share = (1 - w) * m / (w * 0.3 + (1 - w) * m)
    torch.testing.assert_close(logits.grad[0, 1:3], share * plain.grad[0, 1:3], rtol=1e-4, atol=1e-6)


def test_fused_loss_without_a_prior_share_is_the_plain_loss() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 9)
    labels = torch.tensor([[IGNORE, 1, 2, 3, IGNORE], [IGNORE, IGNORE, 4, 5, 6]])
    group = torch.tensor([[-1, 0, 0, -1, -1], [-1, -1, -1, 1, 1]])
    fused = fused_loss(logits, labels, group, torch.log(torch.tensor([0.5, 0.2])), 1e-12)
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1),
                                              ignore_index=IGNORE)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)


def test_sequential_examples_mark_every_completion_item(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", n_items=40, with_model=False))
    assert bundle.prior is not None
    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    seqs = {"u1": [bundle.items[i].item_id for i in (3, 4, 5, 6, 7)], "u2": [bundle.items[i].item_id for i in (9, 2)]}
    examples = sequential_examples(bundle, seqs, max_history=3, dense=True, prior=bundle.prior)
    held = bundle.prior.held_out_log_probs([3, 4, 5, 6, 7])
    # u1's last window: history (4, 5, 6) -> 7; its completion holds 5, 6 and 7, positions 2..4.
    last = examples[3]
    assert last.item_log_prior == pytest.approx(tuple(held[1:4]))
    id_ids = tokens.id_token_ids(tok, bundle.id_format)
    fused = FusedObjective(0.8, frozenset(id_ids), bundle.id_format.depth)
    data = tokenize_examples(tok, examples, fused)
    batch = _collate(data, tok.pad_token_id or 0, fused.depth)
    group, ids = batch["item_group"], batch["input_ids"]
    assert len(batch["item_log_prior"]) == sum(len(e.item_log_prior) for e in examples)
    for g in range(len(batch["item_log_prior"])):
        rows, cols = torch.nonzero(group == g, as_tuple=True)
        assert len(cols) == fused.depth and len(set(rows.tolist())) == 1
        assert all(int(ids[r, c]) in fused.id_token_ids for r, c in zip(rows, cols, strict=True))
        assert (batch["labels"][rows, cols] != IGNORE).all()  # only completion tokens carry an item
    # The spelled item at the last group of the last example is its target.
    r, cols = torch.nonzero(group == len(batch["item_log_prior"]) - 1, as_tuple=True)
    spelled = tok.decode(ids[r[0], cols])
    assert spelled.replace(" ", "") == bundle.spelled_id(2)
