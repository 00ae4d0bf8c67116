"""Training loops on tiny models: SASRec learns an order, and the SFT trainer re-plans its schedule to
the step rate it measures. They train (seconds), so they are not unit tests."""

from __future__ import annotations

import random

import pytest


@pytest.mark.slow
def test_sasrec_learns_a_cyclic_order() -> None:
    from training.baselines import SASRec

    items = [f"i{n}" for n in range(12)]
    train = {f"u{u}": [items[(u + t) % 12] for t in range(8)] for u in range(60)}
    model = SASRec(items, dim=32, max_len=8, dropout=0.0).fit(train, epochs=40, lr=5e-3)
    ranked = model.rank_many([["i3", "i4", "i5"], ["i10", "i11"]], k=3)
    assert [r[0] for r in ranked] == ["i6", "i0"]
    assert all(len(set(r)) == 3 for r in ranked)


@pytest.mark.slow
def test_sft_replans_a_probe_that_underestimated_the_step_rate() -> None:
    """A plan far below what the budget allows (a probe slowed by a busy machine) is re-fitted to the
    measured step rate while training, up to max_epochs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from training.sft import SFTConfig, train_sft
    from training.tasks import Example

    words = [f"w{i}" for i in range(30)]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {w: i for i, w in enumerate(["<pad>", "<eos>", *words])}, unk_token="<pad>")), pad_token="<pad>",
        eos_token="<eos>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    rng = random.Random(0)
    examples = [Example(" ".join(rng.choices(words, k=5)), " " + rng.choice(words), "sequential") for _ in range(64)]
    cfg = SFTConfig(epochs=0.5, batch_size=8, max_minutes=0.1, max_epochs=1000.0)  # plan: 4 of 8000 steps
    stats = train_sft(model, tok, examples, cfg, desc="replan")
    assert stats["replanned_steps"] and stats["replanned_steps"][0] > 4
    assert stats["steps"] > 4
    # It ends by the time guard or by finishing the re-planned schedule, never past its plan.
    assert stats["steps"] <= stats["planned_steps"]
    assert stats["stopped_by_time_budget"] or stats["steps"] == stats["planned_steps"]
