"""The srpo stage: reinforcement learning on trie-constrained samples (training/srpo.py) against a
frozen reference; with select_on_valid the bundle keeps the earlier weights if valid NDCG@10 fell."""

from __future__ import annotations

import copy
import time

from model_store import tokens
from training.config import STAGE_LABELS
from training.stages.run import RecipeRun
from training.stages.validation import keep_better_than_before, measure, snapshot


def run_srpo(run: RecipeRun) -> None:
    from training.srpo import SRPOConfig, frozen_copy, srpo_rows, train_srpo

    t = time.perf_counter()
    minutes = run.budget.stage_minutes("srpo")
    sc = SRPOConfig(**run.cfg.srpo.model_dump(), max_minutes=minutes, seed=run.seed, max_history=run.max_history)
    before = copy.deepcopy(run.model.state_dict()) if run.cfg.select_on_valid else None
    # peft models are their own reference with the adapters disabled.
    ref = None if hasattr(run.model, "disable_adapter") else frozen_copy(run.model)
    rows = srpo_rows(run.ids_bundle, run.train, run.max_history)
    run.log(f"[srpo] {len(rows)} prompts, mode {sc.mode}, G={sc.group_size}")
    run.stats["stage_stats"]["srpo"] = train_srpo(run.model, ref, run.tokenizer, run.ids_bundle, rows, sc,
                                                  tokens.id_token_ids(run.tokenizer, run.ids_bundle.id_format),
                                                  accelerator=run.accelerator)
    del ref
    if run.accelerator is not None:
        run.model = run.accelerator.unwrap_model(run.model)
    run.timings["srpo_s"] = time.perf_counter() - t
    previous = STAGE_LABELS["reason" if "reason" in run.stages else "align"] + " (direct)"
    res = measure(run, "srpo", ["direct", "reasoning"] if sc.mode == "reasoning" else ["direct"])
    snapshot(run, "srpo")
    keep_better_than_before(run, "srpo", before, previous, res)
