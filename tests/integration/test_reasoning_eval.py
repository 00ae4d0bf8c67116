"""`gream eval --mode reasoning` measures the chains the service would stream: generated under the
chain automaton, with the faithfulness figures beside HR/NDCG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_reasoning_eval_reports_faithfulness(tiny_bundle_dir: Path) -> None:
    from transformers import AutoTokenizer

    from model_store.bundle import load_bundle
    from model_store.model import load_bundle_model
    from training.data import EvalRow
    from training.evaluate import evaluate_modes

    bundle = load_bundle(tiny_bundle_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    model = load_bundle_model(bundle.model_path)
    rng = np.random.default_rng(0)
    ids = [it.item_id for it in bundle.items]
    rows = [EvalRow(f"u{n}", [ids[int(i)] for i in rng.choice(len(ids), int(rng.integers(3, 9)), replace=False)],
                    ids[int(rng.integers(len(ids)))]) for n in range(12)]
    out = evaluate_modes(model, tokenizer, bundle, rows, ["direct", "reasoning"], "tiny", beams=10,
                         reasoning_tokens=200)
    figures = out["tiny (reasoning)"]
    assert figures["rows"] == 12 and "HR@10" in figures
    assert figures["grounded_share"] >= 0.95
    assert figures["closed_within_budget_share"] >= 0.9
    assert figures["repeated_4gram_rate"] < 0.2
    assert 12 <= figures["mean_reasoning_tokens"] < 200
    assert figures["time_to_first_token_ms"] > 0


def test_srpo_in_reasoning_mode_samples_grounded_chains(tiny_bundle_dir: Path) -> None:
    """SRPO's sampled chains follow the serving constraint: a couple of steps on the tiny bundle run
    and keep every sampled chain closed (the gate of its reward)."""
    from transformers import AutoTokenizer

    from model_store.bundle import load_bundle
    from model_store.model import load_bundle_model
    from model_store.tokens import id_token_ids
    from training.srpo import SRPOConfig, frozen_copy, srpo_rows, train_srpo

    bundle = load_bundle(tiny_bundle_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    model = load_bundle_model(bundle.model_path)
    ids = [it.item_id for it in bundle.items]
    rows = srpo_rows(bundle, {f"u{u}": ids[u: u + 6] for u in range(0, 60, 6)})
    cfg = SRPOConfig(group_size=2, prompts_per_step=2, steps=2, mode="reasoning", max_reasoning_tokens=80)
    stats = train_srpo(model, frozen_copy(model), tokenizer, bundle, rows, cfg, id_token_ids(tokenizer, bundle.id_format))
    assert stats["steps"] == 2 and stats["mean"]["format"] == 1.0
