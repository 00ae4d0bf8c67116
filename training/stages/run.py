"""What every stage of one recipe run reads and adds to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store.bundle import Bundle
from training.budget import TimeBudget
from training.config import RecipeConfig
from training.data import EvalRow, InteractionData


@dataclass
class RecipeRun:
    """The config, the data, the model being trained (stages replace it when they must), the time
    budget, and the statistics and timings that end up in the bundle's manifest."""

    cfg: RecipeConfig
    stages: list[str]
    out: Path
    data: InteractionData
    train: dict[str, list[str]]  # the sequences trained on (cut before the valid rows with holdout_valid)
    valid_rows: list[EvalRow]
    ids_bundle: Bundle  # the catalog's semantic IDs, without a model
    tokenizer: Any
    model: Any
    prior: Any  # the collaborative prior the bundle ships, or None
    accelerator: Any
    budget: TimeBudget
    log: Callable[[str], None]
    stats: dict[str, Any]
    timings: dict[str, float]

    @property
    def main(self) -> bool:
        """Whether this process evaluates and writes bundles (the only one without accelerate)."""
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def max_history(self) -> int:
        """The history window every stage's prompts hold (and the service's, through the manifest)."""
        return self.cfg.align.max_history
