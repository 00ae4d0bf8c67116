"""SRPO: reinforcement learning on sampled item IDs with prefix-credit rewards.

For each prompt a group of G valid IDs is sampled with the trie as constraint (`ConstrainedSampler`:
the prompt is prefilled once, then at each of the ID's levels the next code is drawn among the trie's
children with the model's probabilities restricted to them). Rewards: 1 for the target, otherwise
sqrt(l / L) for l matched leading codes of an L-token ID (0.5, 0.707, 0.866 for 1, 2, 3 of 4), times a
format gate in reasoning mode (the reasoning must be closed by THINK_END within the token limit).
Advantages: the group-normalised reward (GRPO) plus the pass@k term for sparse successes (with c hits
among n samples, rho = 1 - C(n-c, k) / C(n, k); hits get (1 - rho) / sigma, misses
(1 - rho - C(n-c-1, k-1) / C(n-1, k-1)) / sigma, sigma = sqrt(rho (1 - rho))). Loss: PPO-clipped
ratio of the policy's raw log-probabilities (softmax over the whole vocabulary, the service's scoring)
with a k3 KL penalty to the frozen SFT reference.

Plain PyTorch rather than TRL: TRL's GRPOTrainer samples through `generate`/vLLM and computes its own
advantages; neither the trie-constrained sampling with the service's flat trie nor the pass@k
advantage fits its extension points without subclassing its internals, which change from release to
release. Here the whole algorithm is ~200 lines, runs the same on 2 CPU cores and under
`accelerate launch` (the optional Accelerator wraps model, optimizer and backward).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model_store import tokens
from model_store.bundle import Bundle
from model_store.trie import ROOT, ItemTrie
from training.data import EvalRow
from training.tasks import spell_history


@dataclass(frozen=True)
class SRPOConfig:
    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 16
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    temperature: float = 1.0
    passk_k: int = 4
    passk_weight: float = 1.0
    ppo_epochs: int = 1  # policy updates per sampled batch (ratios differ from 1 after the first)
    mode: str = "direct"  # direct | reasoning
    max_reasoning_tokens: int = 96
    max_history: int = 10
    grad_clip: float = 1.0
    max_minutes: float | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ rewards


def prefix_reward(sample: Sequence[int], target: Sequence[int]) -> float:
    """1 for the exact ID, else sqrt(l / L) for l matched leading codes (0 when the first differs)."""
    depth = len(target)
    matched = 0
    for a, b in zip(sample, target, strict=True):
        if a != b:
            break
        matched += 1
    return 1.0 if matched == depth else math.sqrt(matched / depth)


def pass_at_k(n: int, c: int, k: int) -> float:
    """rho = 1 - C(n-c, k) / C(n, k): chance that k of the n samples hold at least one of the c hits."""
    k = min(k, n)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def passk_advantage(rewards: Sequence[float], k: int, eps: float = 1e-6) -> np.ndarray:
    """The pass@k advantage of each sample of one group (hits are rewards of exactly 1)."""
    r = np.asarray(rewards, dtype=np.float64)
    n, c = len(r), int((r == 1.0).sum())
    k = min(k, n)
    rho = pass_at_k(n, c, k)
    sigma = math.sqrt(rho * (1 - rho))
    hit = (1 - rho) / (sigma + eps)
    miss_share = math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1) if n - c - 1 >= 0 and n > 1 else 0.0
    miss = (1 - rho - miss_share) / (sigma + eps)
    return np.where(r == 1.0, hit, miss)


def group_advantages(rewards: np.ndarray, k: int = 4, passk_weight: float = 1.0, eps: float = 1e-6) -> np.ndarray:
    """[prompts, G] rewards -> advantages: (r - mean) / (std + eps) per group plus the pass@k term."""
    rewards = np.asarray(rewards, dtype=np.float64)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True) if rewards.shape[1] > 1 else np.ones_like(mean)
    adv = (rewards - mean) / (std + eps)
    if passk_weight:
        adv = adv + passk_weight * np.stack([passk_advantage(row, k, eps) for row in rewards])
    return adv


# ------------------------------------------------------------------------------------------ sampling


@dataclass
class Samples:
    codes: np.ndarray  # int64 [N, depth] per-level codes
    token_ids: np.ndarray  # int64 [N, depth] vocabulary ids of the ID tokens
    items: np.ndarray  # int64 [N] item index of each sampled ID
    prompt: np.ndarray  # int64 [N] which prompt each sample belongs to


def pad_left(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class ConstrainedSampler:
    """Samples complete, valid IDs: at each level only the trie's children of the prefix are allowed."""

    def __init__(self, model: Any, trie: ItemTrie, code_token_ids: Sequence[int], pad_id: int = 0):
        self.model = model
        self.trie = trie
        self.code_token = np.asarray(code_token_ids, dtype=np.int64)
        self.pad_id = pad_id

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[Sequence[int]], group: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Samples:
        device = next(self.model.parameters()).device
        ids, mask = pad_left(prompt_ids, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = out.past_key_values
        expand = torch.arange(len(prompt_ids), device=device).repeat_interleave(group)
        cache.batch_select_indices(expand)
        mask = mask[expand]
        last_pos = positions[expand, -1]
        logits = out.logits[expand, -1, :].float()
        n = len(expand)
        nodes = np.full(n, ROOT, dtype=np.int64)
        depth = self.trie.depth
        codes = np.zeros((n, depth), dtype=np.int64)
        toks = np.zeros((n, depth), dtype=np.int64)
        for level in range(depth):
            kids = self.trie.children(nodes)
            width = int(np.bincount(kids.row, minlength=n).max())
            start = np.searchsorted(kids.row, np.arange(n))
            slot = np.arange(len(kids.row)) - start[kids.row]
            cand_tok = np.zeros((n, width), dtype=np.int64)
            cand_node = np.zeros((n, width), dtype=np.int64)
            valid = np.zeros((n, width), dtype=bool)
            cand_tok[kids.row, slot] = self.code_token[kids.code]
            cand_node[kids.row, slot] = kids.node
            valid[kids.row, slot] = True
            cand_logits = logits.gather(1, torch.from_numpy(cand_tok).to(device))
            cand_logits = cand_logits.masked_fill(~torch.from_numpy(valid).to(device), float("-inf"))
            probs = torch.softmax(cand_logits / max(temperature, 1e-5), dim=-1)
            pick = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].numpy()
            rows = np.arange(n)
            nodes = cand_node[rows, pick]
            toks[:, level] = cand_tok[rows, pick]
            codes[:, level] = self.trie.node_code[nodes] - self.trie.id_format.level_offset(level)
            if level + 1 < depth:
                mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=-1)
                last_pos = last_pos + 1
                out = self.model(input_ids=torch.from_numpy(toks[:, level: level + 1]).to(device),
                                 attention_mask=mask, position_ids=last_pos[:, None], past_key_values=cache,
                                 use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
        self.model.train(was_training)
        items = self.trie.node_item[nodes].astype(np.int64)
        return Samples(codes=codes, token_ids=toks, items=items,
                       prompt=np.arange(len(prompt_ids)).repeat(group))


@torch.no_grad()
def _processors(logits_processor: Any) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    return {"logits_processor": LogitsProcessorList([logits_processor])} if logits_processor is not None else {}


def generate_reasoning(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                       sample: bool = False, group: int = 1, temperature: float = 1.0,
                       logits_processor: Any = None) -> tuple[list[list[int]], list[bool]]:
    """Reasoning token ids per (prompt, sample), THINK_END excluded, and whether it was closed.
    `logits_processor` (e.g. training.grounded_generation.GroundedChains) masks each step."""
    think_end = tokenizer.convert_tokens_to_ids(tokens.THINK_END)
    stop = [think_end, tokenizer.eos_token_id]
    answer = tokenizer.convert_tokens_to_ids(tokens.ANSWER)
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else {"do_sample": False}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, num_return_sequences=group,
                         suppress_tokens=[answer], **kwargs,
                         **_processors(logits_processor))
    model.train(was_training)
    reasoning, closed = [], []
    for row in out[:, ids.shape[1]:].tolist():
        body = []
        ok = False
        for t in row:
            if t == think_end:
                ok = True
                break
            if t == tokenizer.eos_token_id or t == tokenizer.pad_token_id:
                break
            body.append(t)
        reasoning.append(body)
        closed.append(ok)
    return reasoning, closed


# ------------------------------------------------------------------------------------------ loss


def token_logprobs(model: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw log-probabilities of tokens sequences[i][starts[i]:] (right-padded [N, T]) and their mask."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[i, : len(s)] = 1
    ids, attn = ids.to(device), attn.to(device)
    first = min(starts)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, first - 1: -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, first:, None])[..., 0]
    pos = torch.arange(first, width, device=device)[None, :]
    loss_mask = (pos >= torch.tensor(list(starts), device=device)[:, None]) & (attn[:, first:] == 1)
    return logp, loss_mask.float()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                advantages: torch.Tensor, clip_eps: float, kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate with per-sequence token means, plus the k3 KL estimate to the reference."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1
    per_token = -surrogate + kl_coef * kl
    denom = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / denom).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    kl, clipped = kl.detach(), clipped.detach()
    return loss, {"kl": float(((kl * mask).sum(-1) / denom).mean()),
                  "clip_frac": float(((clipped * mask).sum(-1) / denom).mean())}


# ------------------------------------------------------------------------------------------ training


def srpo_rows(bundle: Bundle, sequences: dict[str, list[str]], max_history: int = 10) -> list[EvalRow]:
    """RL prompts: the last window of every training sequence (the most recent behaviour)."""
    rows = []
    for user, seq in sequences.items():
        seq = [i for i in seq if i in bundle.index_of]
        if len(seq) >= 2:
            rows.append(EvalRow(user, seq[-1 - max_history: -1], seq[-1]))
    return rows


def train_srpo(model: Any, ref_model: Any, tokenizer: Any, bundle: Bundle, rows: Sequence[EvalRow],
               cfg: SRPOConfig, code_token_ids: Sequence[int], accelerator: Any = None,
               desc: str = "srpo") -> dict[str, Any]:
    """Train `model` in place; `ref_model` is the frozen SFT model (None: the model itself with its
    LoRA adapters disabled). Returns per-run statistics."""
    if cfg.mode not in ("direct", "reasoning"):
        raise ValueError(f"SRPO mode must be direct or reasoning, got {cfg.mode!r}")
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
        rank, world = accelerator.process_index, accelerator.num_processes
        rows = list(rows)[rank::world]
    policy = accelerator.unwrap_model(model) if accelerator is not None else model
    sampler = ConstrainedSampler(policy, bundle.trie, code_token_ids, pad)
    suffix = tokenizer(tokens.reasoning_answer_suffix(), add_special_tokens=False)["input_ids"]
    grounding = None
    if cfg.mode == "reasoning":
        # Sampled chains follow the serving constraint, so the policy learns from the chains it will stream.
        from model_store.grounding import GroundingIndex
        from training.grounded_generation import GroundedChains, grounding_for

        grounding = grounding_for(policy, tokenizer, GroundingIndex(bundle))
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
    history: list[dict[str, float]] = []
    order: list[int] = []
    model.train()
    bar = tqdm(total=cfg.steps, desc=desc, unit="step")
    step = 0
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.prompts_per_step:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[: cfg.prompts_per_step]], order[cfg.prompts_per_step:]
        spelled = [spell_history(bundle, r.history[-cfg.max_history:]) for r in batch]
        targets = [bundle.codes[bundle.index_of[r.target]] for r in batch]
        g = cfg.group_size
        if cfg.mode == "direct":
            prompts = [tokens.direct_prompt(s) for s in spelled]
            prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            samples = sampler.sample(prompt_ids, g, cfg.temperature, gen)
            full_prompts = [prompt_ids[p] for p in samples.prompt]
            starts = [len(p) for p in full_prompts]
            gate = np.ones(len(samples.items))
        else:
            prompts = [tokens.reasoning_prompt(s) for s in spelled]
            prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            assert grounding is not None
            names = [grounding.index.history_of_prompt(p) for p in prompts for _ in range(g)]
            constraint = GroundedChains(grounding, names, max(len(p) for p in prompt_ids), cfg.max_reasoning_tokens)
            reasoning, closed = generate_reasoning(policy, tokenizer, prompt_ids, cfg.max_reasoning_tokens,
                                                   sample=True, group=g, temperature=cfg.temperature,
                                                   logits_processor=constraint)
            id_prompts = [prompt_ids[i // g] + reasoning[i] + suffix for i in range(len(reasoning))]
            samples = sampler.sample(id_prompts, 1, cfg.temperature, gen)
            samples.prompt = np.arange(len(prompt_ids)).repeat(g)
            full_prompts = id_prompts
            # Loss over the generated reasoning, THINK_END (the model's own), and the ID.
            starts = [len(prompt_ids[i // g]) for i in range(len(reasoning))]
            gate = np.asarray(closed, dtype=np.float64)
        rewards = np.array([gate[i] * prefix_reward(samples.codes[i], targets[samples.prompt[i]])
                            for i in range(len(samples.items))]).reshape(len(batch), g)
        adv = group_advantages(rewards, cfg.passk_k, cfg.passk_weight)
        seqs = [list(full_prompts[i]) + samples.token_ids[i].tolist() for i in range(len(samples.items))]
        adv_t = torch.tensor(adv.reshape(-1), dtype=torch.float32)
        live = np.abs(adv.reshape(-1)) > 1e-8  # groups with equal rewards carry no policy signal
        stats = {"reward": float(rewards.mean()), "hit": float((rewards == 1).mean()),
                 "format": float(gate.mean()), "live": float(live.mean())}
        if live.any():
            keep = np.flatnonzero(live).tolist()
            seqs_k = [seqs[i] for i in keep]
            starts_k = [starts[i] for i in keep]
            adv_k = adv_t[keep].to(next(policy.parameters()).device)
            with torch.no_grad():
                old_logp, _ = token_logprobs(policy, seqs_k, starts_k, pad)
                ref_logp, _ = _reference_logprobs(policy, ref_model, seqs_k, starts_k, pad)
            for _ in range(cfg.ppo_epochs):
                logp, mask = token_logprobs(model, seqs_k, starts_k, pad)
                loss, extra = policy_loss(logp, old_logp, ref_logp, mask, adv_k, cfg.clip_eps, cfg.kl_coef)
                opt.zero_grad(set_to_none=True)
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
            stats.update({"loss": float(loss.detach()), **extra})
        history.append(stats)
        bar.update(1)
        recent = history[-20:]
        bar.set_postfix(reward=f"{np.mean([h['reward'] for h in recent]):.3f}",
                        hit=f"{np.mean([h['hit'] for h in recent]):.3f}")
        if deadline and time.perf_counter() > deadline:
            break
    bar.close()
    model.eval()
    summary = {k: float(np.mean([h[k] for h in history if k in h])) for k in ("reward", "hit", "format", "live",
                                                                             "kl", "clip_frac") if
               any(k in h for h in history)}
    first = history[: max(1, len(history) // 5)]
    last = history[-max(1, len(history) // 5):]
    return {"steps": step, "planned_steps": cfg.steps, "prompts": len(rows), "wall_s": time.perf_counter() - start,
            "stopped_by_time_budget": bool(deadline and step < cfg.steps),
            "reward_first_fifth": float(np.mean([h["reward"] for h in first])),
            "reward_last_fifth": float(np.mean([h["reward"] for h in last])), "mean": summary,
            "config": cfg.to_dict()}


@torch.no_grad()
def _reference_logprobs(policy: Any, ref_model: Any, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                        pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ref_model is not None:
        return token_logprobs(ref_model, seqs, starts, pad)
    # A peft model: the reference is the same network with its adapters switched off.
    with policy.disable_adapter():
        return token_logprobs(policy, seqs, starts, pad)


def frozen_copy(model: Any) -> Any:
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
