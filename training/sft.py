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
from typing import Any, NamedTuple

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
    # With a time budget: the most epochs the schedule may be re-planned to. The plan made from a
    # short probe before training is re-fitted to the step rate measured while training (at 5 % and
    # 25 % of the budget), so a probe slowed by a busy machine neither wastes nor overruns the budget.
    max_epochs: float | None = None
    seed: int = 0
    grad_clip: float = 1.0
    # Batches of similar lengths (shuffled within and across groups): mixing 35- and 140-token
    # examples otherwise spends half of every step on padding.
    group_by_length: bool = True
    # bfloat16 autocast for the forward pass (weights and optimizer stay float32): 1.4-1.5x per step
    # measured on a 2-core AVX512-BF16 CPU; "auto" turns it on where the CPU or GPU has bf16 units.
    bf16: bool | str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FusedObjective:
    """Train for the distribution the service decodes from, not for the model alone.

    With mixture fusion (model_store.prior) the service ranks items by w * P(item) + (1 - w) * m(item),
    P the collaborative prior and m the model's probability of the item's ID. For the items of an
    example that carries the prior's held-out log-probabilities (Example.item_log_prior), the loss is
    that mixture's negative log-likelihood, -log(w P + (1 - w) m), instead of -log m; its gradient is
    the plain one scaled by the model's share of the mixture, (1 - w) m / (w P + (1 - w) m), so the
    model spends its capacity where the prior is unsure rather than re-learning the counted pairs.
    Other tokens (separators, EOS, other tasks) keep the plain likelihood."""

    mixture_weight: float
    id_token_ids: frozenset[int]
    depth: int  # ID tokens per item


class Tokenized(NamedTuple):
    ids: list[int]  # prompt + completion + EOS
    prompt_len: int  # where the loss starts
    items: tuple[tuple[int, float], ...] = ()  # fused objective: (position of the ID's first token, log P)


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], fused: FusedObjective | None = None
                      ) -> list[Tokenized]:
    """Token ids of prompt + completion + EOS and the prompt length; with `fused`, also where each
    completion item's ID starts, with its prior log-probability."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for e, p, c in zip(examples, prompts, completions, strict=True):
        items: tuple[tuple[int, float], ...] = ()
        if fused is not None and e.item_log_prior:
            where = [len(p) + i for i, tok in enumerate(c) if tok in fused.id_token_ids]
            if len(where) != fused.depth * len(e.item_log_prior):
                raise ValueError(f"a {e.task} example's completion holds {len(where)} ID tokens for "
                                 f"{len(e.item_log_prior)} items of {fused.depth} tokens")
            items = tuple((where[n * fused.depth], lp) for n, lp in enumerate(e.item_log_prior))
        out.append(Tokenized(p + c + [eos], len(p), items))
    return out


def _collate(batch: Sequence[Tokenized], pad_id: int, depth: int = 0) -> dict[str, torch.Tensor]:
    """Padded input ids, attention mask and labels; for examples with items (and their ID `depth`),
    also `item_group` (the batch's item index at each of its ID tokens, -1 elsewhere) and
    `item_log_prior` (one per item)."""
    width = max(len(t.ids) for t in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    group = torch.full((len(batch), width), -1, dtype=torch.long)
    log_prior: list[float] = []
    for row, t in enumerate(batch):
        input_ids[row, : len(t.ids)] = torch.tensor(t.ids)
        labels[row, t.prompt_len: len(t.ids)] = torch.tensor(t.ids[t.prompt_len:])
        mask[row, : len(t.ids)] = 1
        for start, lp in t.items:
            group[row, start: start + depth] = len(log_prior)
            log_prior.append(lp)
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if log_prior:
        out |= {"item_group": group, "item_log_prior": torch.tensor(log_prior, dtype=torch.float32)}
    return out


def fused_loss(logits: torch.Tensor, labels: torch.Tensor, item_group: torch.Tensor, item_log_prior: torch.Tensor,
               mixture_weight: float) -> torch.Tensor:
    """Mean over label tokens, as the plain causal-LM loss, with each item's ID tokens counted as
    one term -log(w P + (1 - w) m) (FusedObjective)."""
    logits, labels, group = logits[:, :-1].float(), labels[:, 1:], item_group[:, 1:]
    valid = labels != IGNORE
    token_lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_lp = torch.where(valid, token_lp, torch.zeros_like(token_lp))
    in_item = group >= 0
    plain = -token_lp[~in_item].sum()
    item_lm = torch.zeros(len(item_log_prior), device=logits.device).index_add(0, group[in_item], token_lp[in_item])
    mixed = torch.logaddexp(math.log(mixture_weight) + item_log_prior.to(logits.device),
                            math.log1p(-mixture_weight) + item_lm)
    return (plain - mixed.sum()) / valid.sum().clamp(min=1)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    if setting == "auto":
        return (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_bf16())
    return bool(setting)


def epoch_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, group_by_length: bool
                  ) -> list[list[int]]:
    """One epoch's batches of example indices. Grouped by length: shuffle, sort within windows of 50
    batches, cut, shuffle the batches; the order stays random while padding nearly vanishes."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s: s + window], key=lengths.__getitem__)]
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def train_sft(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: SFTConfig,
              desc: str = "sft", accelerator: Any = None, fused: FusedObjective | None = None) -> dict[str, Any]:
    """Train in place; returns steps, final loss, wall time and whether the time budget stopped it.
    With `fused`, examples that carry prior log-probabilities train the fused objective.

    With an `accelerate` Accelerator each process trains on its shard of the examples (the gradients
    are averaged by accelerate's DDP wrapper); without one it is plain single-device PyTorch."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = tokenize_examples(tokenizer, examples, fused)
    shard = len(data)
    if accelerator is not None:  # every process plans the same number of steps, or DDP would hang
        shard = math.ceil(len(data) / accelerator.num_processes)
        data = data[accelerator.process_index:: accelerator.num_processes]
    steps_per_epoch = max(1, math.ceil(shard / cfg.batch_size))
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(total_steps * cfg.warmup_frac))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    train_model = model
    if accelerator is not None:
        # The scheduler stays unwrapped: accelerate's wrapper steps it once per process, and
        # total_steps above already counts this process's steps.
        train_model, opt = accelerator.prepare(model, opt)
    device = next(model.parameters()).device
    bf16 = use_bf16(cfg.bf16, device)
    train_model.train()
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
    step, ema, stopped_early = 0, None, False
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(t.ids) for t in data]
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not _is_main(accelerator))
    batches: list[list[int]] = []
    cap_steps = max(total_steps, int(steps_per_epoch * cfg.max_epochs)) if cfg.max_epochs else total_steps
    replan_at = [start + f * (deadline - start) for f in (0.05, 0.25)] if deadline else []
    replans: list[int] = []
    while step < total_steps:
        if not batches:
            batches = epoch_batches(lengths, cfg.batch_size, rng, cfg.group_by_length)
        batch = {k: v.to(device) for k, v in
                 _collate([data[i] for i in batches.pop()], pad, fused.depth if fused else 0).items()}
        group, log_prior = batch.pop("item_group", None), batch.pop("item_log_prior", None)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if group is None or fused is None:
                loss = train_model(**batch).loss
            else:
                labels = batch.pop("labels")
                loss = fused_loss(train_model(**batch).logits, labels, group, log_prior, fused.mixture_weight)
        opt.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        if not deadline:
            continue
        now = time.perf_counter()
        # Re-plan at the scheduled points, and when the plan ends with much of the budget left; one
        # collective per step decides both that and the stop.
        due = bool(replan_at) and now >= replan_at[0]
        ending = step == total_steps and total_steps < cap_steps and deadline - now > 0.05 * (deadline - start)
        replan, past_deadline = _any_process([due or ending, now > deadline], accelerator, device)
        if past_deadline:
            stopped_early = True
            break
        if replan:
            while replan_at and now >= replan_at[0]:
                replan_at.pop(0)
            new_total = _replanned_steps(step, start, deadline, cap_steps, accelerator, device)
            if new_total is not None and new_total != total_steps:
                total_steps = max(step + 1, new_total)
                replans.append(total_steps)
                bar.total = total_steps
                bar.refresh()
    bar.close()
    model.eval()
    return {"steps": step, "planned_steps": total_steps, "replanned_steps": replans, "examples": len(data),
            "final_loss": ema,
            "wall_s": time.perf_counter() - start, "stopped_by_time_budget": stopped_early, "bf16": bf16,
            "config": cfg.to_dict()}


def _replanned_steps(step: int, start: float, deadline: float, cap_steps: int, accelerator: Any,
                     device: torch.device) -> int | None:
    """Total steps that fit the budget at the rate measured so far (97 %, for the evaluation and
    saving after the loop), capped; the same number on every process (the slowest one's)."""
    elapsed = time.perf_counter() - start
    if step < 4 or elapsed <= 0:
        return None
    affordable = step + (deadline - time.perf_counter()) * step / elapsed * 0.97
    if accelerator is not None and accelerator.num_processes > 1:
        affordable = float(accelerator.gather(torch.tensor([affordable], device=device)).min().item())
    return int(min(cap_steps, affordable))


def padded_tokens_per_step(tokenizer: Any, examples: Sequence[Example], batch_size: int,
                           group_by_length: bool = True, seed: int = 0) -> float:
    """Mean padded tokens (batch x longest) of one epoch's batches: what a step costs, for budgeting."""
    lengths = [len(t.ids) for t in tokenize_examples(tokenizer, examples)]
    batches = epoch_batches(lengths, batch_size, random.Random(seed), group_by_length)
    return sum(len(b) * max(lengths[i] for i in b) for b in batches) / max(1, len(batches))


def _any_process(flags: list[bool], accelerator: Any, device: torch.device) -> list[bool]:
    """Decisions taken by every process together: a flag holds if it holds on any process."""
    if accelerator is None or accelerator.num_processes == 1:
        return flags
    summed = accelerator.reduce(torch.tensor([float(f) for f in flags], device=device), reduction="sum")
    return [bool(v > 0) for v in summed.tolist()]


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process
