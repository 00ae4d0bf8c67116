"""The GREAM training recipe end to end: align -> reason -> srpo, within a time budget, to a bundle.

    data folder (items, train, valid) -> semantic IDs -> tokenizer (catalog BPE, or a local HF one,
    extended with the ID tokens) -> backbone (small Llama from scratch, or a local HF causal LM, LoRA
    optional)                                                  (training/stages/prepare.py)
    -> align: SFT on the alignment mix                         (training/stages/align.py)
    -> reason: SFT on the reasoning curriculum, stage by stage (training/stages/reason.py)
    -> srpo: RL on constrained samples                         (training/stages/srpo.py)
    -> a servable bundle (model_store.bundle.save_bundle) with every stage's statistics in its manifest,
       plus one snapshot bundle per stage next to it (`OUT.stages/<stage>`) for the per-stage table
                                                               (training/stages/validation.py).

Only train.jsonl and valid.jsonl are read here: after each stage the model is measured on valid rows
(never on test). Settings come from a preset (training/presets: `tiny`: CI smoke, `demo`, `small`: the
2-core full run) or a file that may name a preset as `base` and override its keys (training/config.py).
Each stage gets its share of `--max-minutes` when it starts (training/budget.py), and each SFT stage
fits its epochs to that share by timing a few steps first, so the learning-rate schedule completes.

Runs unchanged under `accelerate launch` / `torchrun`: when accelerate is installed an Accelerator
wraps the optimisation of every stage, each process takes its shard of the examples and prompts, and
only the main process evaluates and writes bundles.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from training.budget import TimeBudget
from training.config import STAGE_ORDER, load_config
from training.data import InteractionData


def run_recipe(data_dir: str | Path, out: str | Path, config: str | Mapping[str, Any] | None = "small",
               stages: Sequence[str] = STAGE_ORDER, max_minutes: float | None = 60.0,
               items_path: str | Path | None = None, teacher_url: str | None = None,
               teacher_model: str = "default", log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Train with the recipe and write the bundle to `out`; returns its path and the training stats."""
    from training.stages.align import alignment, run_align
    from training.stages.prepare import make_accelerator, prepare
    from training.stages.reason import run_reason
    from training.stages.run import RecipeRun
    from training.stages.srpo import run_srpo
    from training.stages.validation import measure_with_prior, save_recipe_bundle
    from training.tasks import holdout_sequences

    t0 = time.perf_counter()
    cfg = load_config(config)
    stages = recipe_stages(stages)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_dir, out = Path(data_dir), Path(out)
    items_path = Path(items_path) if items_path else data_dir / "items.jsonl"
    data = InteractionData.load(data_dir)
    train = holdout_sequences(data.train, data.valid) if cfg.holdout_valid else data.train
    valid_rows = data.valid[: cfg.eval.valid_rows]
    accelerator = make_accelerator()
    timings: dict[str, float] = {}
    stats: dict[str, Any] = {"kind": "gream-recipe", "config": cfg.to_dict(), "stages": stages,
                             "max_minutes": max_minutes, "data": str(data_dir), "holdout_valid": cfg.holdout_valid,
                             "valid_rows": len(valid_rows), "stage_stats": {}, "valid": {}, "stage_bundles": {}}

    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}-work-", dir=out.parent))
    try:
        t = time.perf_counter()
        prepared = prepare(data_dir, items_path, cfg, train, data.valid, stages, workdir, accelerator, log)
        timings["prepare_s"] = time.perf_counter() - t
        stats["model_parameters"] = sum(p.numel() for p in prepared.model.parameters())
        budget = TimeBudget.starting(t0, max_minutes, cfg.budget, stages)
        stats["stage_minutes"] = budget.given
        run = RecipeRun(cfg=cfg, stages=stages, out=out, data=data, train=train, valid_rows=valid_rows,
                        ids_bundle=prepared.ids_bundle, tokenizer=prepared.tokenizer, model=prepared.model,
                        prior=prepared.prior, accelerator=accelerator, budget=budget, log=log, stats=stats,
                        timings=timings)

        aligned = alignment(run)  # the reason stage replays these examples even when align is skipped
        if "align" in stages:
            run_align(run, aligned)
        if "reason" in stages:
            run_reason(run, aligned, teacher_url, teacher_model)
        if "srpo" in stages:
            run_srpo(run)
        measure_with_prior(run)

        timings["total_s"] = time.perf_counter() - t0
        stats["timings"] = timings
        path = out
        if run.main:
            path = save_recipe_bundle(out, run, stats)
            log(f"[done] bundle -> {path} in {timings['total_s'] / 60:.1f} min")
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return path, stats
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def recipe_stages(stages: Sequence[str]) -> list[str]:
    """The stages asked for, in recipe order; an unknown or empty list is an error."""
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown or not stages:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in stages]
