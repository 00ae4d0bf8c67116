"""Shared-prompt beam decoding for Llama-family models (Llama, Qwen2, Mistral without sliding window).

HFTrieDecoder copies each prompt's KV cache to its beams once; this decoder never copies it. In every
decode step the beams of one prompt form a single query block that attends to the prompt's keys and
values (computed once by the prefill) and, in the same softmax, to the beam's own 1-3 generated
tokens; only those few generated keys/values are reordered between steps. On CPU this halves the
decode cost again (docs/experiments/2026-11-27-beam-search-cpu.md: 924 ms against 1718 ms at batch 32).

The prefill is a lean layer loop too: Hugging Face's generic forward (mask builders, cache objects,
output wrappers) cost more than the arithmetic of a 60-token prompt on a small model (8 ms against
about 2 ms on 2 cores), which mattered most for single requests.

Every prompt starts with the same preamble (model_store.tokens.PREAMBLE), so its keys and values
are computed once and reused by every batch (a static prefix cache, as vLLM's prefix caching does
for shared prompt heads); only the history part of each prompt is prefilled. It and the oneDNN-packed
weight copies are refreshed when the parameters' version counters change, so a model that is trained
further is never served stale keys or weights.

The layers' own weights are used (q/k/v and gate/up stacked into one matrix each, the modules'
parameters rebound to views of it) with the models' own formulas for RMSNorm, rotary embedding and
the gated MLP, so the numbers are the model's; only the call structure is written out here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model_store.prior import NodeFusion
from model_store.tokens import PREAMBLE
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


def _onednn_linear() -> tuple[Any, Any] | None:
    """oneDNN's (pack weight, linear with a packed weight) ops, or None where torch lacks them."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_linear()


class _Linear:
    """x W^T + b with W pre-packed for oneDNN: on this CPU the 10-row matmuls of one request's beams
    run 2-3x faster than F.linear (lm_head [10, 256] x [256, 5029]: 161 against 473 us), batches of 32
    prompts 13 % faster. The packed copy is refreshed by `repack` after the weights change; where
    packing is unavailable, or does not reproduce F.linear, F.linear is used."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool = True):
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None
        self.pack = pack and _ONEDNN is not None
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        if not self.pack:
            return
        assert _ONEDNN is not None
        try:
            packed = _ONEDNN[0](self.weight.detach(), None)
            probe = torch.randn(3, self.weight.shape[1], dtype=self.weight.dtype, device=self.weight.device)
            ok = torch.allclose(_ONEDNN[1](probe, packed, self.bias, "none", [], ""),
                                F.linear(probe, self.weight, self.bias), atol=1e-3, rtol=1e-3)
        except RuntimeError:
            ok = False
        self.packed = packed if ok else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _ONEDNN[1](x, self.packed, self.bias, "none", [], "")  # type: ignore[index]
        return F.linear(x, self.weight, self.bias)


class _Layer:
    """One decoder layer's weights, taken from the model's modules: the q/k/v and gate/up projections
    as one matrix each (5 small matmuls become 2), applied as plain functions, since nn.Module dispatch
    costs more than the arithmetic of a single request's beams."""

    def __init__(self, layer: Any, pack: bool = True):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_proj = _Linear(*_fuse([attn.q_proj, attn.k_proj, attn.v_proj]), pack)
        self.q_size, self.kv_size = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        self.o_proj = _Linear(attn.o_proj.weight, attn.o_proj.bias, pack)
        self.gate_up_proj = _Linear(*_fuse([mlp.gate_proj, mlp.up_proj]), pack)
        self.inter = mlp.gate_proj.weight.shape[0]
        self.down_proj = _Linear(mlp.down_proj.weight, mlp.down_proj.bias, pack)
        self.act = mlp.act_fn
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)

    def repack(self) -> None:
        for proj in (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj):
            proj.repack()

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fused = self.qkv_proj(_rms_norm(hidden, *self.norm1))
        return fused.split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def out_and_mlp(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.o_proj(attn_out)
        gate, up = self.gate_up_proj(_rms_norm(hidden, *self.norm2)).split(self.inter, -1)
        return hidden + self.down_proj(self.act(gate) * up)


@torch.no_grad()
def _fuse(linears: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights (and biases) stacked into one matrix. The modules' own parameters are
    rebound to views of it, so nothing is stored twice and the model's other code paths (and any
    in-place optimizer update) keep seeing the same numbers."""
    # Already stacked by an earlier decoder on this model: reuse that memory, so every decoder built
    # on the model (and the model itself) keeps seeing the same weights after in-place updates.
    weight = _stacked_view([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = _stacked_view(biases) if all(b is not None for b in biases) else None  # type: ignore[arg-type]
    if weight is not None and (bias is not None or all(b is None for b in biases)):
        return weight, bias
    weight = torch.cat([m.weight for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.weight.new_zeros(m.weight.shape[0]) if m.bias is None else m.bias for m in linears])
    offset = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[offset:offset + rows]
        if m.bias is not None:
            m.bias.data = bias[offset:offset + rows]  # type: ignore[index]
        offset += rows
    return weight, bias


def _stacked_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over `parts` when they lie back to back in one storage (as `_fuse` leaves them)."""
    first = parts[0]
    if not all(p.is_contiguous() and p.dim() == first.dim() and p.shape[1:] == first.shape[1:] for p in parts):
        return None
    row = first[0].numel() * first.element_size() if first.dim() > 1 else first.element_size()
    start, offset = first.untyped_storage().data_ptr(), first.data_ptr()
    for p in parts:
        if p.untyped_storage().data_ptr() != start or p.data_ptr() != offset:
            return None
        offset += p.shape[0] * row
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm / Qwen2RMSNorm exactly: statistics in float32, the weight applied in the input dtype.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SharedPrefixDecoder(HFTrieDecoder):
    """Same interface and results as HFTrieDecoder, faster decode steps."""

    def __init__(self, model: Any, tokenizer: Any, trie: Any, code_token_ids: Sequence[int],
                 static_prefix: str | None = PREAMBLE, packed_weights: bool = True):
        if not supports_shared_prefix(model):
            raise ValueError(f"shared-prefix decoding does not support model type {model.config.model_type!r}")
        super().__init__(model, tokenizer, trie, code_token_ids)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        # packed_weights: oneDNN copies of the projections (twice the weights' memory, 2-3x faster
        # small matmuls on CPU), refreshed when the weights change.
        self.layers = [_Layer(layer, packed_weights) for layer in model.model.layers]
        self.final_norm = (model.model.norm.weight, model.model.norm.variance_epsilon)
        self.lm_head = _Linear(model.lm_head.weight, None, packed_weights)
        self.static_ids: list[int] = list(tokenizer(static_prefix, add_special_tokens=False)["input_ids"]) \
            if static_prefix else []
        self._static_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._weights_key = self._weights_version()

    def _weights_version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.model.parameters())

    def _sync_with_weights(self) -> None:
        """After the model's weights changed in place (training): re-pack the oneDNN copies and drop
        the static prefix's keys and values. One pass over the version counters per call."""
        key = self._weights_version()
        if key != self._weights_key:
            for layer in self.layers:
                layer.repack()
            self.lm_head.repack()
            self._static_kv = None
            self._weights_key = key

    def static_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's rotated keys and values of the static prefix ([1, kv heads, P, head dim])."""
        self._sync_with_weights()
        return self._cached_static_kv()

    def _cached_static_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._static_kv is None:
            ids = torch.tensor([self.static_ids], device=self.device)
            _, self._static_kv = self._prefill(ids, torch.ones_like(ids),
                                               torch.arange(ids.shape[1], device=self.device)[None])
        return self._static_kv

    def _split_static(self, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]] | None
                      ) -> tuple[list[list[int]], bool]:
        """Token ids of every prompt, without the static prefix when all of them start with it."""
        ids = [list(p) for p in prompt_ids] if prompt_ids is not None else \
            [list(x) for x in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        n = len(self.static_ids)
        if n and all(len(p) > n and p[:n] == self.static_ids for p in ids):
            return [p[n:] for p in ids], True
        return ids, False

    @torch.inference_mode()
    def topk(self, prompts: Sequence[str], ks: Sequence[int], widths: Sequence[int],
             filters: Sequence[TrieFilter | None] | None = None,
             prompt_ids: Sequence[Sequence[int]] | None = None,
             biases: Sequence[NodeFusion | None] | None = None) -> list[list[ScoredItem]]:
        batch = len(prompts) if prompt_ids is None else len(prompt_ids)
        filters = list(filters) if filters is not None else [None] * batch
        bias = stack_biases(biases, self.search.trie.num_nodes)
        self._sync_with_weights()
        ids, cached = self._split_static(prompts, prompt_ids)
        enc = self._pad_ids(ids)
        mask = enc["attention_mask"]
        static = self._cached_static_kv() if cached else None
        offset = len(self.static_ids) if cached else 0
        positions = offset + (mask.cumsum(-1) - 1).clamp(min=0)
        # keys rotated, [B, kvh, P + Lp, d] (the static prefix first when cached)
        logits, prompt_kv = self._prefill(enc["input_ids"], mask, positions, static)
        step = self.search.advance(self.search.start(batch), torch.log_softmax(logits.float(), -1), widths,
                                   filters, bias)
        if cached:
            mask = torch.cat([mask.new_ones(batch, offset), mask], dim=-1)
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

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 static: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The prompts' last-position logits and every layer's rotated keys and values. With `static`
        (the static prefix's keys and values), `ids` continue it: they attend to it in full."""
        base = self.model.model
        batch, length = ids.shape
        hidden = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        if static is None and bool(mask.all()):
            attn_mask, causal = None, True
        else:
            # Causal and no padded keys; each padded query may see itself, so no row is empty (NaN).
            allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
            allowed = allowed | torch.eye(length, dtype=torch.bool)[None]
            if static is not None:  # every query sees the whole static prefix
                allowed = torch.cat([allowed.new_ones(allowed.shape[0], length, static[0][0].shape[2]), allowed], -1)
            attn_mask, causal = allowed[:, None], False
        kv = []
        for layer_idx, layer in enumerate(self.layers):
            q, k, v = layer.qkv(hidden)
            q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if static is not None:
                sk, sv = static[layer_idx]
                k = torch.cat([sk.expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([sv.expand(batch, -1, -1, -1), v], dim=2)
            kv.append((k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scaling,
                                               enable_gqa=self.kv_heads != self.heads)
            hidden = layer.out_and_mlp(hidden, o.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))
        return self.lm_head(_rms_norm(hidden[:, -1], *self.final_norm)), kv

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
        for layer_idx, layer in enumerate(self.layers):
            q, k, v = layer.qkv(hidden)
            q = q.reshape(n, self.heads, 1, self.head_dim)
            k = k.reshape(n, self.kv_heads, 1, self.head_dim)
            v = v.reshape(n, self.kv_heads, 1, self.head_dim)
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
            hidden = layer.out_and_mlp(hidden, o.reshape(n, 1, self.heads * self.head_dim))
        return self.lm_head(_rms_norm(hidden[:, -1], *self.final_norm)), new_gen


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
