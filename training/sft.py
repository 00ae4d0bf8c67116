"""Supervised fine-tuning on (prompt, completion) pairs: loss on completion tokens only.

Plain PyTorch on purpose: a few dozen lines that run the same on 2 CPU cores and, wrapped by
`accelerate`, on several GPUs; the Trainer API would add little here and hide the time budget.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from training.tasks import Example

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    epochs: float = 3.0
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    max_minutes: float | None = None  # stop early (cleanly) when the time budget is spent
    seed: int = 0
    grad_clip: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_examples(tokenizer: Any, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion + EOS, and the prompt length (where the loss starts)."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + c + [eos], len(p)) for p, c in zip(prompts, completions)]


def _collate(batch: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_sft(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: SFTConfig,
              desc: str = "sft") -> dict[str, Any]:
    """Train in place; returns steps, final loss, wall time and whether the time budget stopped it."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = tokenize_examples(tokenizer, examples)
    steps_per_epoch = max(1, math.ceil(len(data) / cfg.batch_size))
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(total_steps * cfg.warmup_frac))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
    step, ema, stopped_early = 0, None, False
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=total_steps, desc=desc, unit="step")
    order: list[int] = []
    while step < total_steps:
        if not order:
            order = list(range(len(data)))
            rng.shuffle(order)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = _collate([data[i] for i in idx], pad)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        if deadline and time.perf_counter() > deadline:
            stopped_early = True
            break
    bar.close()
    model.eval()
    return {"steps": step, "planned_steps": total_steps, "examples": len(data), "final_loss": ema,
            "wall_s": time.perf_counter() - start, "stopped_by_time_budget": stopped_early,
            "config": cfg.to_dict()}
