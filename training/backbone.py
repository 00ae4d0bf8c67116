"""Backbones: a small Llama/Qwen2 model from scratch, or a local pretrained causal LM, always with the
embeddings sized to the ID-extended tokenizer, LoRA optional. Nothing is downloaded."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ScratchConfig:
    arch: str = "llama"  # llama | qwen2
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704
    max_positions: int = 1024
    tie_embeddings: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCRATCH_PRESETS: dict[str, ScratchConfig] = {
    "demo": ScratchConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=352),
    "tiny": ScratchConfig(),
    "small": ScratchConfig(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024),
}


def build_scratch_model(cfg: ScratchConfig, tokenizer: Any) -> Any:
    """A randomly initialised causal LM whose vocabulary is exactly the tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    common = {
        "vocab_size": len(tokenizer), "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_positions,
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    if cfg.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if cfg.arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(f"unknown scratch architecture {cfg.arch!r}; choose llama or qwen2")


def load_pretrained_model(path: str | Path, tokenizer: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A local Hugging Face causal LM with its embeddings resized to the extended tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        # mean_resizing initialises new rows at the mean embedding: a better start than noise.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model


def plain_model(model: Any) -> Any:
    """The model to save and serve: LoRA adapters merged into a copy when peft wraps it."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model
