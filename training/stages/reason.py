"""The reason stage: SFT on the reasoning curriculum (training/curriculum.py), one sub-stage per
reasoning section, each mixed with replayed alignment examples so direct mode is not forgotten."""

from __future__ import annotations

import os
import time

from model_store import tokens
from training.stages.align import Alignment
from training.stages.run import RecipeRun
from training.stages.timed_sft import run_sft
from training.stages.validation import measure, snapshot


def run_reason(run: RecipeRun, alignment: Alignment, teacher_url: str | None, teacher_model: str) -> None:
    """The curriculum's sub-stages share the stage's minutes equally; a teacher endpoint, when given,
    writes the reasoning instead of the offline templates."""
    from training.curriculum import CurriculumConfig, TeacherClient, ThemeIndex, curriculum_examples
    from training.tasks import mix_examples

    t = time.perf_counter()
    minutes = run.budget.stage_minutes("reason")
    section = run.cfg.reason
    seed = run.seed
    ccfg = CurriculumConfig(max_history=run.max_history, max_examples=section.max_examples, seed=seed)
    themes = ThemeIndex(run.ids_bundle, run.train)
    teacher = TeacherClient(teacher_url, teacher_model, os.environ.get("GREAM_TEACHER_API_KEY")) \
        if teacher_url else None
    n_stages = len(tokens.REASONING_STAGES)
    per_stage = None if minutes is None else minutes / n_stages
    align_examples = alignment.examples
    sub_stats = []
    for s in range(1, n_stages + 1):
        examples = curriculum_examples(run.ids_bundle, run.train, s, ccfg, themes, teacher)
        replay = mix_examples({"align": align_examples},
                              {"align": min(1.0, section.align_replay * len(examples) / max(1, len(align_examples)))},
                              seed + s)
        mixed = mix_examples({"reason": examples, "replay": replay}, {"reason": 1.0, "replay": 1.0}, seed + s)
        run.log(f"[reason {s}/5: +{tokens.REASONING_STAGES[s - 1]}] {len(examples)} reasoning + "
                f"{len(replay)} replayed alignment examples")
        sub_stats.append(run_sft(run.model, run.tokenizer, mixed, section, per_stage, seed + s, f"reason {s}/5",
                                 run.accelerator, alignment.fused))
    run.stats["stage_stats"]["reason"] = {"substages": sub_stats,
                                          "teacher_failures": teacher.failures if teacher else None}
    run.timings["reason_s"] = time.perf_counter() - t
    measure(run, "reason", ["direct", "reasoning"])
    snapshot(run, "reason")
