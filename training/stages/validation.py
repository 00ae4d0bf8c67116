"""Measuring the recipe on valid rows after each stage, the per-stage snapshot bundles, the choice of
weights the bundle keeps (select_on_valid), and writing the bundle itself."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_store.bundle import Bundle, save_bundle
from training.backbone import plain_model
from training.config import STAGE_LABELS
from training.evaluate import evaluate_modes
from training.stages.run import RecipeRun


def measure(run: RecipeRun, stage: str, modes: Sequence[str]) -> dict[str, dict[str, float]]:
    """The model after `stage` on the valid rows, in `modes`, added to the run's `valid` stats."""
    if not run.main or not run.valid_rows:
        return {}
    ev = run.cfg.eval
    t = time.perf_counter()
    res = evaluate_modes(plain_model(run.model), run.tokenizer, run.ids_bundle, run.valid_rows, modes,
                         STAGE_LABELS[stage], beams=ev.beams, reasoning_rows=ev.reasoning_rows,
                         reasoning_tokens=ev.reasoning_tokens, max_history=run.max_history)
    run.timings[f"{stage}_valid_eval_s"] = time.perf_counter() - t
    _record(run, res)
    return res


def measure_with_prior(run: RecipeRun) -> None:
    """The final model fused with the collaborative prior, as the service decodes it (direct mode)."""
    from training.tasks import holdout_sequences

    if run.prior is None or not run.main or not run.valid_rows:
        return
    t = time.perf_counter()
    last = STAGE_LABELS[run.stages[-1]]
    # Valid targets are inside train.jsonl: the prior shipped counts them, so measure with one
    # counted on train cut before the valid rows (same settings), or valid would flatter it.
    index = run.ids_bundle.index_of
    valid_prior = run.prior.refit([index[i] for i in seq if i in index]
                                  for seq in holdout_sequences(run.train, run.data.valid).values())
    res = evaluate_modes(plain_model(run.model), run.tokenizer, run.ids_bundle, run.valid_rows, ["direct"],
                         f"{last} +prior", beams=run.cfg.eval.beams, prior=valid_prior, max_history=run.max_history)
    run.timings["prior_valid_eval_s"] = time.perf_counter() - t
    _record(run, res)


def _record(run: RecipeRun, res: dict[str, dict[str, float]]) -> None:
    for name, m in res.items():
        run.log(f"[valid] {name}: HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f}")
    run.stats["valid"].update(res)


def keep_better_than_before(run: RecipeRun, stage: str, before: dict[str, Any] | None, previous_label: str,
                            res: dict[str, dict[str, float]]) -> None:
    """With select_on_valid (`before` holds the weights the stage started from): back to them when the
    stage lowered valid NDCG@10 (direct mode) below the previous stage's."""
    new = res.get(f"{STAGE_LABELS[stage]} (direct)")
    old = run.stats["valid"].get(previous_label)
    if before is not None and new and old and new["NDCG@10"] < old["NDCG@10"]:
        run.log(f"[{stage}] valid NDCG@10 fell ({old['NDCG@10']:.4f} -> {new['NDCG@10']:.4f}): "
                f"keeping the pre-{STAGE_LABELS[stage].lstrip('+')} weights in the bundle (select_on_valid)")
        run.model.load_state_dict(before)
        run.stats[f"{stage}_reverted"] = True


def snapshot(run: RecipeRun, stage: str) -> None:
    """The model after `stage` as its own bundle (`OUT.stages/<stage>`), recorded in the stats."""
    if run.main and run.cfg.stage_bundles:
        path = save_recipe_bundle(Path(f"{run.out}.stages") / stage, run,
                                  {"kind": "gream-recipe-stage", "stage": stage, "label": STAGE_LABELS[stage]})
        run.stats["stage_bundles"][stage] = os.path.relpath(path, run.out)


def save_recipe_bundle(out: Path, run: RecipeRun, stats: dict[str, Any]) -> Path:
    """The run's model with its IDs, tokenizer and prior as a servable bundle; `stats` go to the
    manifest's `training` statistics."""
    ids_bundle = run.ids_bundle
    # The service reads `prompt_history` so its prompts hold the history window the model was trained on.
    settings = {**ids_bundle.manifest["settings"], "prompt_history": run.max_history}
    return save_bundle(out, items=ids_bundle.items, codes=ids_bundle.codes, codebooks=ids_bundle.codebooks,
                       id_format=ids_bundle.id_format, tokenizer=run.tokenizer, model=plain_model(run.model),
                       popularity=ids_bundle.popularity, settings=settings,
                       stats={**ids_bundle.manifest["stats"], "training": stats}, prior=run.prior, overwrite=True)


def stage_bundle_paths(bundle: Bundle) -> dict[str, Path]:
    """The per-stage snapshot bundles recorded in a recipe bundle's manifest (those still present)."""
    recorded = bundle.manifest.get("stats", {}).get("training", {}).get("stage_bundles", {})
    return {stage: (bundle.path / rel).resolve() for stage, rel in recorded.items()
            if (bundle.path / rel / "manifest.json").is_file()}
