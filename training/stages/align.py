"""The align stage: SFT on the collaborative-semantic alignment mix (training/tasks.py), optionally
with the fused objective that trains the model for the prior mixture the service decodes from."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from model_store import tokens
from model_store.bundle import Bundle
from training.config import AlignSection
from training.stages.run import RecipeRun
from training.stages.timed_sft import run_sft
from training.stages.validation import measure, snapshot


class Alignment(NamedTuple):
    """The alignment examples (the reason stage replays them) and the fused objective, or None."""

    examples: list[Any]
    fused: Any


def alignment(run: RecipeRun) -> Alignment:
    from training.tasks import alignment_examples

    section = run.cfg.align
    fused = fused_objective(section, run.prior, run.tokenizer, run.ids_bundle)
    if fused is not None:
        run.log(f"[align] fused objective: the model learns the mixture w * prior + (1 - w) * model, w = "
                f"{fused.mixture_weight:g}, against held-out prior probabilities")
    weights = section.weights.model_dump() if section.weights is not None else None
    examples = alignment_examples(run.ids_bundle, run.train, weights, run.max_history, run.seed,
                                  section.dense_history, run.prior if fused is not None else None,
                                  section.windows)
    return Alignment(examples, fused)


def run_align(run: RecipeRun, data: Alignment) -> None:
    t = time.perf_counter()
    minutes = run.budget.stage_minutes("align")
    run.log(f"[align] {len(data.examples)} examples, "
            + (f"{minutes:.1f} min budget" if minutes else "no time budget"))
    run.stats["stage_stats"]["align"] = run_sft(run.model, run.tokenizer, data.examples, run.cfg.align, minutes,
                                                run.seed, "align", run.accelerator, data.fused)
    run.timings["align_s"] = time.perf_counter() - t
    measure(run, "align", ["direct"])
    snapshot(run, "align")


def fused_objective(section: AlignSection, prior: Any, tokenizer: Any, ids_bundle: Bundle) -> Any:
    """The SFT trainer's FusedObjective when the config asks for it (`align.fused_objective`: true, or
    the prior weight to train for), else None; it needs the bundle's prior with mixture fusion, the
    distribution the service decodes from."""
    from training.sft import FusedObjective

    setting = section.fused_objective
    if not setting:
        return None
    if prior is None or prior.settings.fusion != "mixture":
        raise ValueError("align.fused_objective needs the collaborative prior with mixture fusion "
                         "(prior.enabled = true, prior.fusion = \"mixture\")")
    # true: train for the mixture weight the bundle serves; a number: train for that weight.
    weight = prior.settings.mixture_weight if setting is True else float(setting)
    if not 0 < weight < 1:
        raise ValueError(f"align.fused_objective must be true, false or a prior weight in (0, 1), got {setting!r}")
    return FusedObjective(weight, frozenset(tokens.id_token_ids(tokenizer, ids_bundle.id_format)),
                          ids_bundle.id_format.depth)
