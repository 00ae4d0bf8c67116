"""Loading a bundle's model: a standard transformers causal LM saved in the bundle's `model/` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_bundle_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The bundle's causal LM in eval mode, from its local folder only (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype).eval()
