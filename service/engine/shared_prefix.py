"""Shared-prompt beam decoding for Llama-family models (Llama, Qwen2, Mistral without sliding window).

HFTrieDecoder copies each prompt's KV cache to its beams once; this decoder never copies it. In every
decode step the beams of one prompt form a single query block that attends to the prompt's keys and
values (computed once by the prefill) and, in the same softmax, to the beam's own 1-3 generated
tokens; only those few generated keys/values are reordered between steps. On CPU this halves the
decode cost again (../shared/notes/beam-search-cpu.md: 924 ms against 1718 ms at batch 32).

The prefill is a lean layer loop too: Hugging Face's generic forward (mask builders, cache objects,
output wrappers) cost more than the arithmetic of a 60-token prompt on a small model (8 ms against
about 2 ms on 2 cores), which mattered most for single requests.

The layers' own modules (norms, projections, MLP, rotary embedding) are reused, so the weights and
numerics are the model's; only the attention arithmetic is written out here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model_store.trie import TrieFilter
from service.engine.base import ScoredItem
from service.engine.beam import stack_biases
from service.engine.hf_decoder import HFTrieDecoder

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}


def supports_shared_prefix(model: Any) -> bool:
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if cfg.model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        return False
    return not (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SharedPrefixDecoder(HFTrieDecoder):
    """Same interface and results as HFTrieDecoder, faster decode steps."""

    def __init__(self, model: Any, tokenizer: Any, trie: Any, code_token_ids: Sequence[int]):
        if not supports_shared_prefix(model):
            raise ValueError(f"shared-prefix decoding does not support model type {model.config.model_type!r}")
        super().__init__(model, tokenizer, trie, code_token_ids)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5

    @torch.inference_mode()
    def topk(self, prompts: Sequence[str], ks: Sequence[int], widths: Sequence[int],
             filters: Sequence[TrieFilter | None] | None = None,
             prompt_ids: Sequence[Sequence[int]] | None = None,
             biases: Sequence[np.ndarray | None] | None = None) -> list[list[ScoredItem]]:
        batch = len(prompts) if prompt_ids is None else len(prompt_ids)
        filters = list(filters) if filters is not None else [None] * batch
        bias = stack_biases(biases, self.search.trie.num_nodes)
        enc = self.encode(prompts) if prompt_ids is None else self._pad_ids(prompt_ids)
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, prompt_kv = self._prefill(enc["input_ids"], mask, positions)  # keys rotated, [B, kvh, Lp, d]
        step = self.search.advance(self.search.start(batch), torch.log_softmax(logits.float(), -1), widths,
                                   filters, bias)
        # Additive mask over prompt keys: left padding must get no attention.
        prompt_bias = torch.zeros(mask.shape, dtype=prompt_kv[0][0].dtype).masked_fill(mask == 0, float("-inf"))
        next_pos = positions[:, -1] + 1  # position of the first generated token, per prompt
        gen_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        width = max(widths)
        for depth in range(1, self.search.depth):
            parent = torch.from_numpy(step.parent)
            beam_prompt = torch.from_numpy(step.state.prompt)
            rank = torch.from_numpy(_rank_within_prompt(step.state.prompt))
            if gen_kv is not None:
                gen_kv = [(k[parent], v[parent]) for k, v in gen_kv]
            logits, gen_kv = self._decode_step(torch.from_numpy(step.token), beam_prompt, rank, width,
                                               next_pos[beam_prompt] + depth - 1, prompt_kv, prompt_bias, gen_kv)
            step = self.search.advance(step.state, torch.log_softmax(logits.float(), -1), widths, filters, bias)
        return self.search.finish(step.state, batch, ks)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The prompts' last-position logits and every layer's rotated keys and values."""
        base = self.model.model
        batch, length = ids.shape
        hidden = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        if bool(mask.all()):
            attn_mask, causal = None, True
        else:
            # Causal and no padded keys; each padded query may see itself, so no row is empty (NaN).
            allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
            attn_mask, causal = (allowed | torch.eye(length, dtype=torch.bool)[None])[:, None], False
        kv = []
        for layer in base.layers:
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv.append((k, v))
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scaling,
                enable_gqa=self.kv_heads != self.heads)
            hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(base.norm(hidden[:, -1:]))[:, -1, :], kv

    def _decode_step(self, tokens: torch.Tensor, beam_prompt: torch.Tensor, rank: torch.Tensor, width: int,
                     positions: torch.Tensor, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]],
                     prompt_bias: torch.Tensor, gen_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
                     ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        base = self.model.model
        n = len(tokens)
        groups = self.heads // self.kv_heads
        hidden = base.embed_tokens(tokens[:, None])  # [n, 1, hidden]
        cos, sin = base.rotary_emb(hidden, positions[:, None])  # [n, 1, d]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        batch = prompt_bias.shape[0]
        new_gen = []
        for layer_idx, layer in enumerate(base.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, self.heads, 1, self.head_dim)
            k = attn.k_proj(x).view(n, self.kv_heads, 1, self.head_dim)
            v = attn.v_proj(x).view(n, self.kv_heads, 1, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if gen_kv is not None:
                k = torch.cat([gen_kv[layer_idx][0], k], dim=2)
                v = torch.cat([gen_kv[layer_idx][1], v], dim=2)
            new_gen.append((k, v))
            qg = q.view(n, self.kv_heads, groups, self.head_dim)
            pk, pv = prompt_kv[layer_idx]
            # The beams of prompt b form one query block [kvh, width * groups] against b's keys.
            block = qg.new_zeros(batch, width, self.kv_heads, groups, self.head_dim)
            block[beam_prompt, rank] = qg
            block = block.permute(0, 2, 1, 3, 4).reshape(batch, self.kv_heads, width * groups, self.head_dim)
            s_prompt = torch.matmul(block, pk.transpose(-1, -2)) * self.scaling + prompt_bias[:, None, None, :]
            s_prompt = s_prompt.view(batch, self.kv_heads, width, groups, -1)[beam_prompt, :, rank]
            s_gen = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling  # [n, kvh, groups, t]
            probs = torch.softmax(torch.cat([s_prompt, s_gen], dim=-1), dim=-1)
            p_prompt, p_gen = probs[..., : pk.shape[2]], probs[..., pk.shape[2]:]
            packed = probs.new_zeros(batch, width, self.kv_heads, groups, pk.shape[2])
            packed[beam_prompt, rank] = p_prompt
            packed = packed.permute(0, 2, 1, 3, 4).reshape(batch, self.kv_heads, width * groups, -1)
            o_prompt = torch.matmul(packed, pv).view(batch, self.kv_heads, width, groups, self.head_dim)
            o = o_prompt[beam_prompt, :, rank] + torch.matmul(p_gen, v)  # [n, kvh, groups, d]
            hidden = hidden + attn.o_proj(o.reshape(n, 1, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = base.norm(hidden)
        return self.model.lm_head(hidden)[:, -1, :], new_gen


def _rank_within_prompt(prompt: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal prompt indices (beams are grouped by prompt)."""
    start = np.searchsorted(prompt, prompt, side="left")
    return (np.arange(len(prompt)) - start).astype(np.int64)


def make_decoder(model: Any, tokenizer: Any, trie: Any, code_token_ids: Sequence[int]) -> HFTrieDecoder:
    """The fastest decoder the model supports. The shared-prefix attention is a CPU optimisation (it
    saves copying each prompt's cache to its beams); on an accelerator the plain HF steps are used."""
    if supports_shared_prefix(model) and next(model.parameters()).device.type == "cpu":
        return SharedPrefixDecoder(model, tokenizer, trie, code_token_ids)
    return HFTrieDecoder(model, tokenizer, trie, code_token_ids)
