"""Backbones: a small Llama/Qwen2 model from scratch, or a local pretrained causal LM, always with the
embeddings sized to the ID-extended tokenizer, LoRA optional. Nothing is downloaded."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from training.config import BackboneSection


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


def build_backbone(section: BackboneSection, tokenizer: Any, seed: int) -> Any:
    """The recipe's model: a local pretrained LM when `pretrained` is set, else one from scratch;
    wrapped with LoRA adapters when `lora` is set."""
    if section.pretrained:
        model = load_pretrained_model(section.pretrained, tokenizer, dtype=getattr(torch, section.dtype))
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    else:
        scratch = section.scratch
        shape = SCRATCH_PRESETS[scratch] if isinstance(scratch, str) else ScratchConfig(**scratch.model_dump())
        model = build_scratch_model(dataclasses.replace(shape, seed=seed), tokenizer)
    lora = section.lora
    if lora is None:
        return model
    # New ID tokens need trained embeddings: the embedding and output layers are trained in full.
    from peft import LoraConfig, get_peft_model

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    extra = {"ensure_weight_tying": True} if tied and "ensure_weight_tying" in {
        f.name for f in dataclasses.fields(LoraConfig)} else {}
    modules_to_save = lora.modules_to_save
    if modules_to_save is None:
        modules_to_save = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        modules_to_save=list(modules_to_save), task_type="CAUSAL_LM", **extra))


def plain_model(model: Any) -> Any:
    """The model to save and serve: LoRA adapters merged into a copy when peft wraps it."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model
