"""Dropout for training a stock Hugging Face decoder that has none of its own.

Llama and Qwen2 configs carry only attention dropout; a sequential recommender on a few thousand users
needs dropout on the residual stream (the embeddings and each block's attention and MLP outputs), as
SASRec has. It is added with forward hooks for the length of a training stage and removed after, so
the saved model is the plain architecture both engines load, and evaluation (model.eval()) is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _dropout_hook(p: float) -> Any:
    def hook(module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return nn.functional.dropout(output, p, training=module.training)
        return output
    return hook


def residual_modules(model: nn.Module) -> list[nn.Module]:
    """The input embedding and, in each decoder block, the attention output projection and the MLP:
    the branches that write into the residual stream."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no decoder layers at .model.layers; residual dropout "
                         "supports Llama-style causal LMs")
    out: list[nn.Module] = [base.get_input_embeddings()]
    for layer in layers:
        out += [layer.self_attn.o_proj, layer.mlp]
    return out


@contextmanager
def residual_dropout(model: nn.Module, p: float) -> Iterator[None]:
    """Dropout with probability `p` on the residual branches while the block runs (no-op for p = 0)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    handles = [m.register_forward_hook(_dropout_hook(p)) for m in residual_modules(model)] if p > 0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()
