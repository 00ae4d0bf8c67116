"""A supervised stage fitted to its time share: a few timed steps decide how many epochs fit, so the
learning-rate schedule completes within the budget."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from training.config import SFTSection
from training.regularisation import residual_dropout


def fit_epochs(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int, epochs: float,
               minutes: float | None, max_steps: int | None = None, probe_steps: int = 2) -> tuple[float, float]:
    """Epochs that fit `minutes`: times `probe_steps` forward/backward passes (weights unchanged) as
    the trainer runs them (bf16 autocast where it would), per token, scaled to the mean padded size
    of the trainer's length-grouped batches."""
    from training.sft import SFTConfig, _collate, padded_tokens_per_step, tokenize_examples, use_bf16

    steps_per_epoch = max(1, math.ceil(len(examples) / batch_size))
    if max_steps:
        epochs = min(epochs, max_steps / steps_per_epoch)
    if not minutes or epochs * steps_per_epoch <= 10:  # a few steps: the time guard is enough
        return epochs, float("nan")
    sample = random.Random(0).sample(list(examples), min(batch_size, len(examples)))
    batch = _collate(tokenize_examples(tokenizer, sample), tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    bf16 = use_bf16(SFTConfig.bf16, device)
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(**batch).loss.backward()  # warm-up: first calls pay for allocations and kernel choice
    start = time.perf_counter()
    for _ in range(probe_steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
    per_token = (time.perf_counter() - start) / probe_steps / batch["input_ids"].numel()
    # x1.25: the optimizer step, collation and Python overhead (measured 0.59 s vs 0.47 s probed).
    per_step = per_token * padded_tokens_per_step(tokenizer, examples, batch_size) * 1.25
    model.zero_grad(set_to_none=True)
    model.eval()
    affordable = minutes * 60 / per_step
    return max(1.0 / steps_per_epoch, min(epochs, affordable / steps_per_epoch)), per_step


def run_sft(model: Any, tokenizer: Any, examples: Sequence[Any], section: SFTSection, minutes: float | None,
            seed: int, desc: str, accelerator: Any = None, fused: Any = None) -> dict[str, Any]:
    """One supervised stage within `minutes` (None: the section's epochs and step cap); its stats."""
    from training.sft import SFTConfig, train_sft

    t = time.perf_counter()
    epochs, per_step = fit_epochs(model, tokenizer, examples, section.batch_size, section.epochs, minutes,
                                  section.max_steps)
    if minutes:  # the probe's time comes out of the stage's budget
        minutes = max(0.1, minutes - (time.perf_counter() - t) / 60)
        epochs, _ = fit_epochs(model, tokenizer, examples, section.batch_size, epochs, None)
    # The most the schedule may be re-planned to while training: the preset's epochs and step cap.
    cap, _ = fit_epochs(model, tokenizer, examples, section.batch_size, section.epochs, None, section.max_steps)
    cfg = SFTConfig(epochs=epochs, batch_size=section.batch_size, lr=section.lr, max_minutes=minutes, seed=seed,
                    max_epochs=cap, weight_decay=section.weight_decay)
    with residual_dropout(model, section.dropout):
        stats = train_sft(model, tokenizer, examples, cfg, desc=desc, accelerator=accelerator, fused=fused)
    return {**stats, "probe_s_per_step": per_step, "tasks": _task_counts(examples),
            "fused_objective": None if fused is None else {"mixture_weight": fused.mixture_weight}}


def _task_counts(examples: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.task] = out.get(e.task, 0) + 1
    return out
