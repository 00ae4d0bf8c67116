"""Before training: the catalog's semantic IDs, the collaborative prior, the tokenizer and the backbone."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from model_store.bundle import Bundle, load_bundle
from model_store.semantic_ids import QuantizerConfig
from training.config import BackboneSection, PriorSection, RecipeConfig
from training.data import EvalRow


class Prepared(NamedTuple):
    ids_bundle: Bundle
    prior: Any
    tokenizer: Any
    model: Any


def prepare(data_dir: Path, items_path: Path, cfg: RecipeConfig, train: dict[str, list[str]],
            valid: Sequence[EvalRow], stages: Sequence[str], workdir: Path, accelerator: Any,
            log: Callable[[str], None]) -> Prepared:
    """Everything the stages train: IDs in `workdir`, the prior, the tokenizer and the model."""

    log(f"[prepare] semantic IDs for {items_path}")
    ids_bundle = prepare_ids(data_dir, items_path, cfg, workdir, log)
    prior = fit_prior(ids_bundle, train, valid, cfg.prior, log)
    tokenizer = make_tokenizer(ids_bundle, cfg, train, with_reasoning="reason" in stages)
    model = build_backbone(cfg.backbone, tokenizer, cfg.seed)
    if accelerator is not None:
        model = model.to(accelerator.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[prepare] {len(ids_bundle.items)} items, ID depth {ids_bundle.id_format.depth}, vocabulary "
        f"{len(tokenizer)}, model {n_params / 1e6:.1f}M parameters")
    return Prepared(ids_bundle, prior, tokenizer, model)


def quantizer_config(cfg: RecipeConfig) -> QuantizerConfig:
    """The semantic-ID quantizer a recipe asks for (the builder grows its de-duplication level when a
    catalog crowds more items onto one base ID)."""
    ids = cfg.ids
    return QuantizerConfig(levels=ids.levels, codebook_size=ids.codebook_size,
                           dedup_size=ids.dedup_size if ids.dedup_size is not None else ids.codebook_size,
                           seed=cfg.seed, balanced=ids.balanced)


def prepare_ids(data_dir: Path, items_path: Path, cfg: RecipeConfig, workdir: Path, log: Callable[[str], None]
                ) -> Bundle:
    """Semantic IDs for the catalog (a bundle without model in `workdir`)."""
    from model_store.builder import BuildConfig, build_bundle
    from model_store.semantic_ids import DEFAULT_EMBEDDER

    ids = cfg.ids
    build = BuildConfig(quantizer=quantizer_config(cfg), embedder=ids.embedder or DEFAULT_EMBEDDER,
                        tokenizer=cfg.backbone.tokenizer or cfg.backbone.pretrained,
                        tokenizer_vocab_size=cfg.tokenizer.vocab_size)
    build_bundle(items_path, workdir / "ids", build, interactions=data_dir / "train.jsonl", overwrite=True, log=log)
    return load_bundle(workdir / "ids")


def make_tokenizer(ids_bundle: Bundle, cfg: RecipeConfig, train: dict[str, list[str]], with_reasoning: bool) -> Any:
    """The ID bundle's tokenizer, or for scratch models one retrained with the reasoning templates' words."""
    from transformers import AutoTokenizer

    from model_store.tokenizer import train_catalog_tokenizer
    from training.curriculum import tokenizer_corpus

    if cfg.backbone.pretrained or cfg.backbone.tokenizer or not with_reasoning:
        return AutoTokenizer.from_pretrained(str(ids_bundle.tokenizer_path), local_files_only=True)
    texts = [t for it in ids_bundle.items for t in (it.title, it.brand, it.categories) if t]
    corpus = tokenizer_corpus(ids_bundle, train, n=400, seed=cfg.seed)
    return train_catalog_tokenizer(texts + corpus * 3, ids_bundle.id_format, vocab_size=cfg.tokenizer.vocab_size)


def fit_prior(ids_bundle: Bundle, train: dict[str, list[str]], valid: Sequence[EvalRow],
              section: PriorSection, log: Callable[[str], None]) -> Any:
    """The collaborative prior the bundle ships (None when disabled): transition weights tuned on valid
    rows against train cut before them (and counts or probabilities), counts from `train`, fusion and
    floor from the config."""
    from model_store.prior import TransitionPrior
    from training.baselines import WeightedTransitionBaseline
    from training.tasks import holdout_sequences

    if not section.enabled:
        return None
    settings = section.settings()
    if section.tune_weights and valid:
        cut = holdout_sequences(train, valid)
        tuned, ndcg = WeightedTransitionBaseline.tune(cut, valid)
        settings = replace(settings, weights=tuned["weights"], normalise_rows=tuned["normalise_rows"])
        log(f"[prior] transition weights {list(tuned['weights'])}, "
            f"{'per-item probabilities' if tuned['normalise_rows'] else 'counts'} (valid NDCG@10 {ndcg:.4f} alone)")
        if section.tune_history:
            history, ndcg = WeightedTransitionBaseline.tune_history(cut, valid, tuned)
            settings = replace(settings, **history)
            log(f"[prior] earlier history items weight {history['history_weight']:g}, decay "
                f"{history['history_decay']:g} (valid NDCG@10 {ndcg:.4f} alone)")
    index = ids_bundle.index_of
    return TransitionPrior.fit(([index[i] for i in seq if i in index] for seq in train.values()),
                               len(ids_bundle.items), settings)


def make_accelerator() -> Any:
    """accelerate's Accelerator when installed (multi-GPU via `accelerate launch`), else None."""
    if os.environ.get("GREAM_NO_ACCELERATE"):
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        return None
    return Accelerator()


def build_backbone(section: BackboneSection, tokenizer: Any, seed: int) -> Any:
    """The recipe's model: a local pretrained LM when `pretrained` is set, else one from scratch;
    wrapped with LoRA adapters when `lora` is set."""
    if section.pretrained:
        import torch

        from training.backbone import load_pretrained_model

        model = load_pretrained_model(section.pretrained, tokenizer, dtype=getattr(torch, section.dtype))
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    else:
        from training.backbone import SCRATCH_PRESETS, ScratchConfig, build_scratch_model

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
