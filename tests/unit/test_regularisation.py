"""Residual dropout is hooked on for training and leaves no trace on the saved or evaluated model."""

from __future__ import annotations

import pytest
import torch

from training.regularisation import residual_dropout, residual_modules


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64))


def test_dropout_acts_in_training_only_and_is_removed(model) -> None:
    ids = torch.randint(0, 50, (2, 6))
    model.eval()
    reference = model(ids).logits
    assert len(residual_modules(model)) == 1 + 2 * 2
    with residual_dropout(model, 0.5):
        model.train()
        noisy = model(ids).logits
        model.eval()
        assert torch.allclose(model(ids).logits, reference)  # eval mode: exact
    assert not torch.allclose(noisy, reference)
    model.train()
    after = model(ids).logits  # hooks gone: training mode computes the plain model again
    model.eval()
    assert torch.allclose(after, reference)
    with pytest.raises(ValueError, match="dropout"), residual_dropout(model, 1.0):
        pass
