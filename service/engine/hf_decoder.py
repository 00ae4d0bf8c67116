"""Trie-constrained top-k with a Hugging Face causal LM, written for speed on CPU.

Unlike `generate(num_beams=..., prefix_allowed_tokens_fn=...)` (the reference decoding of GREAM's and
MiniOneRec's code), each prompt is prefilled once, its KV cache is copied to its beams once, only the
last position's logits are computed, and the trie is consulted through flat arrays for all beams at
once (docs/experiments/2026-11-27-beam-search-cpu.md has the measurements behind these choices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model_store.prior import NodeFusion
from model_store.trie import ItemTrie, TrieFilter
from service.engine.base import ScoredItem
from service.engine.beam import StackedFusion, Step, TrieBeamSearch, stack_biases


@dataclass
class Prefilled:
    batch: int
    filters: list[TrieFilter | None]
    biases: StackedFusion | None  # the batch's prior terms (beam.stack_biases), None without a prior
    mask: torch.Tensor  # [batch, prompt length], left padded
    positions: torch.Tensor  # [batch, prompt length]
    cache: Any  # the prompts' KV cache (transformers Cache)
    step: Step  # the first beam step, taken from the prompts' last logits


class HFTrieDecoder:
    def __init__(self, model: Any, tokenizer: Any, trie: ItemTrie, code_token_ids: Sequence[int]):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.search = TrieBeamSearch(trie, code_token_ids)
        self.device = next(model.parameters()).device

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, -1, :].float(), dim=-1)

    def prefill(self, prompts: Sequence[str], widths: Sequence[int],
                filters: Sequence[TrieFilter | None] | None = None,
                prompt_ids: Sequence[Sequence[int]] | None = None,
                biases: Sequence[NodeFusion | None] | None = None) -> Prefilled:
        """Run every prompt once (left-padded batch) and take the first beam step from its logits."""
        batch = len(prompts) if prompt_ids is None else len(prompt_ids)
        filters = list(filters) if filters is not None else [None] * batch
        bias = stack_biases(biases, self.search.trie.num_nodes)
        enc = self.encode(prompts) if prompt_ids is None else self._pad_ids(prompt_ids)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        step = self.search.advance(self.search.start(batch), self._logprobs(out.logits), widths, filters, bias)
        return Prefilled(batch, filters, bias, mask, positions, out.past_key_values, step)

    @torch.inference_mode()
    def topk(self, prompts: Sequence[str], ks: Sequence[int], widths: Sequence[int],
             filters: Sequence[TrieFilter | None] | None = None,
             prompt_ids: Sequence[Sequence[int]] | None = None,
             biases: Sequence[NodeFusion | None] | None = None) -> list[list[ScoredItem]]:
        """Top-k items per prompt by trie-constrained beam search with `widths[p]` beams; `biases[p]` is
        prompt p's prior term (model_store.prior.TransitionPrior.node_fusion) or None."""
        pre = self.prefill(prompts, widths, filters, prompt_ids, biases)
        cache, mask, step = pre.cache, pre.mask, pre.step
        last_pos = pre.positions[:, -1]
        for _ in range(1, self.search.depth):
            parent = torch.from_numpy(step.parent).to(self.device)
            # Copy each parent's cache rows to its children (on the first step: prompt -> beams).
            cache.batch_select_indices(parent)
            mask = torch.cat([mask[parent], mask.new_ones(len(parent), 1)], dim=-1)
            last_pos = last_pos[parent] + 1
            out = self.model(input_ids=torch.from_numpy(step.token)[:, None].to(self.device), attention_mask=mask,
                             position_ids=last_pos[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step = self.search.advance(step.state, self._logprobs(out.logits), widths, pre.filters, pre.biases)
        return self.search.finish(step.state, pre.batch, ks)

    def _pad_ids(self, prompt_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        width = max(len(p) for p in prompt_ids)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return {"input_ids": ids, "attention_mask": mask}


def exhaustive_scores(model: Any, tokenizer: Any, prompt: str, codes: np.ndarray,
                      code_token_ids: Sequence[int], id_format: Any) -> np.ndarray:
    """Teacher-forced summed raw log-probability of every item's ID (for tests; O(items) forwards)."""
    token_of = np.asarray(code_token_ids)
    flat = np.stack([id_format.level_offset(lv) + codes[:, lv] for lv in range(codes.shape[1])], 1)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([ids + list(token_of[row]) for row in flat])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=seq).logits.float(), -1)
    n = len(ids)
    targets = seq[:, n:]
    picked = logp[:, n - 1: -1].gather(-1, targets[..., None])[..., 0]
    return picked.sum(-1).double().numpy()
