"""The GREAM training recipe end to end: align -> reason -> srpo, within a time budget, to a bundle.

    data folder (items, train, valid) -> semantic IDs -> tokenizer (catalog BPE, or a local HF one,
    extended with the ID tokens) -> backbone (small Llama from scratch, or a local HF causal LM, LoRA
    optional) -> align: SFT on the alignment mix (training/tasks.py)
              -> reason: SFT on the reasoning curriculum, stage by stage (training/curriculum.py)
              -> srpo: RL on constrained samples (training/srpo.py)
    -> a servable bundle (model_store.bundle.save_bundle) with every stage's statistics in its manifest,
       plus one snapshot bundle per stage next to it (`OUT.stages/<stage>`) for the per-stage table.

Only train.jsonl and valid.jsonl are read here: after each stage the model is measured on valid rows
(never on test). Settings come from a preset (`tiny`: CI smoke, `small`: the 2-core full run) or a
JSON/TOML file that may name a preset as `base` and override any key. Each stage's SFT epochs are fitted
to its share of `--max-minutes` by timing a few steps first, so the learning-rate schedule completes.

Runs unchanged under `accelerate launch` / `torchrun`: when accelerate is installed an Accelerator
wraps the optimisation of every stage, each process takes its shard of the examples and prompts, and
only the main process evaluates and writes bundles.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from model_store import tokens
from model_store.bundle import Bundle, load_bundle, save_bundle
from training.data import EvalRow, InteractionData

STAGE_ORDER = ("align", "reason", "srpo")
STAGE_LABELS = {"align": "SFT", "reason": "+curriculum", "srpo": "+SRPO"}

# ------------------------------------------------------------------------------------------ configs

PRESETS: dict[str, dict[str, Any]] = {
    # CI smoke: a 2-layer model and a few steps of every stage; minutes on 2 cores.
    "tiny": {
        "seed": 0,
        "ids": {"levels": 3, "codebook_size": 16, "dedup_size": 32, "balanced": True},
        "tokenizer": {"vocab_size": 1500},
        "backbone": {"scratch": "demo"},
        "align": {"epochs": 2.0, "max_steps": 30, "batch_size": 32, "lr": 3e-3, "max_history": 10,
                  "fused_objective": True,  # off in small; on here so that CI runs its code path end to end
                  "weights": {"sequential": 1.0, "text_to_id": 1.0, "id_to_title": 0.5, "titles_history": 0.5}},
        "reason": {"epochs": 1.0, "max_steps": 8, "batch_size": 16, "lr": 1e-3, "max_examples": 400,
                   "align_replay": 0.5},
        "srpo": {"steps": 6, "group_size": 4, "prompts_per_step": 8, "lr": 1e-4, "mode": "direct"},
        "prior": {"enabled": True, "fusion": "mixture", "mixture_weight": 0.8, "floor": 0.02, "tune_weights": True},
        "eval": {"valid_rows": 64, "reasoning_rows": 16, "beams": 20, "reasoning_tokens": 64},
        "budget": {"align": 0.5, "reason": 0.3, "srpo": 0.2, "eval_reserve": 0.15},
        "holdout_valid": False,
        "select_on_valid": False,
        "stage_bundles": True,
    },
    # `gream demo`: synthetic data, a few minutes on 2 cores; reasoning included so the stream reads well.
    "demo": {
        "seed": 0,
        "ids": {"levels": 3, "codebook_size": 64, "dedup_size": 64, "balanced": True},
        "tokenizer": {"vocab_size": 2000},
        "backbone": {"scratch": "demo"},
        "align": {"epochs": 8.0, "batch_size": 64, "lr": 3e-3, "max_history": 10,
                  "weights": {"sequential": 1.0, "text_to_id": 0.5, "id_to_title": 0.25, "titles_history": 0.25}},
        "reason": {"epochs": 1.0, "batch_size": 32, "lr": 1e-3, "max_examples": 1500, "align_replay": 0.5},
        "srpo": {"steps": 40, "group_size": 8, "prompts_per_step": 16, "lr": 5e-5, "mode": "direct"},
        "prior": {"enabled": True, "fusion": "mixture", "mixture_weight": 0.8, "floor": 0.02, "tune_weights": True},
        "eval": {"valid_rows": 300, "reasoning_rows": 20, "beams": 10, "reasoning_tokens": 96},
        "budget": {"align": 0.65, "reason": 0.25, "srpo": 0.1, "eval_reserve": 0.1},
        "holdout_valid": False,
        "select_on_valid": True,
        "stage_bundles": False,
    },
    # The full run on 2 CPU cores within an hour (amazon-industrial: 3,686 items, ~18k interactions).
    "small": {
        "seed": 0,
        "ids": {"levels": 3, "codebook_size": 64, "dedup_size": 64, "balanced": True},
        "tokenizer": {"vocab_size": 4000},
        # ScratchConfig "demo" (hidden 128, 2 layers) with small batches: on amazon-industrial the
        # 4-layer/256 model at batch 64 did not even fit its training windows in 9 minutes (in-sample
        # HR@10 0.06), while this one memorised a 300-user subset in 1 minute (in-sample HR@10 1.0)
        # and reached valid HR@10 0.081 in 8 minutes; learning here is limited by optimizer steps.
        "backbone": {"scratch": "demo"},
        # fused_objective (training.sft, FusedObjective) stays off: at 10 min of alignment it beat the
        # plain likelihood on valid at every prior weight (holdout models, all 4,532 rows, NDCG@10
        # 0.0975-0.0982 against 0.0948-0.0966), at 20 min it fell below weighted transitions (0.0893 /
        # 0.0938 at weights 0.5 / 0.8, against 0.0963), and the full run with it lost on test too
        # (README, "Fused objective").
        "align": {"epochs": 40.0, "batch_size": 16, "lr": 3e-3, "max_history": 10, "dense_history": True,
                  "fused_objective": False,
                  "weights": {"sequential": 1.0, "text_to_id": 1.0, "id_to_title": 0.5, "titles_history": 0.5}},
        "reason": {"epochs": 2.0, "batch_size": 16, "lr": 5e-4, "max_examples": 6000, "align_replay": 0.5},
        # SRPO gave the largest valid gain per minute and stopped at a 400-step cap after 3 of its 18
        # minutes in the first full run: the step cap is now above what its time share allows.
        "srpo": {"steps": 2500, "group_size": 8, "prompts_per_step": 16, "lr": 5e-5, "kl_coef": 0.04,
                 "mode": "direct"},
        # Collaborative prior fused into decoding (model_store.prior); transition weights (and counts or
        # probabilities), then the earlier-history term, tuned on valid against train cut before the
        # valid rows, as the weighted-transitions baseline is. Fusion chosen on valid rows with a model
        # trained on the cut train (holdout_valid, align only, 10 min): with the prior's history term
        # the mixture at prior weights 0.7 / 0.8 / 0.9 / 0.95 gave NDCG@10 0.0966 / 0.0975 / 0.0983 /
        # 0.0985 (HR@10 0.1222 / 0.1222 / 0.1229 / 0.1222), the prior alone 0.0986, weighted
        # transitions 0.0963; without the term (the count prior), 0.5-0.9 gave 0.0948-0.0966 and the
        # product 0.0931 / 0.0943 at strengths 2 / 4.
        "prior": {"enabled": True, "fusion": "mixture", "mixture_weight": 0.95, "floor": 0.02, "tune_weights": True},
        "eval": {"valid_rows": 1000, "reasoning_rows": 300, "beams": 20, "reasoning_tokens": 256},
        "budget": {"align": 0.55, "reason": 0.25, "srpo": 0.2, "eval_reserve": 0.1},
        "holdout_valid": False,
        "select_on_valid": True,
        "stage_bundles": True,
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(spec: str | dict[str, Any] | None) -> dict[str, Any]:
    """A preset name (tiny|small), a JSON/TOML file (optionally with `base = "tiny"`), or a dict."""
    if spec is None:
        spec = "small"
    if isinstance(spec, dict):
        raw = spec
    elif spec in PRESETS:
        return copy.deepcopy(PRESETS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    base = raw.get("base", "small")
    if base not in PRESETS:
        raise ValueError(f"config base {base!r} is not a preset ({', '.join(PRESETS)})")
    return _merge(PRESETS[base], {k: v for k, v in raw.items() if k != "base"})


# ------------------------------------------------------------------------------------------ helpers


def make_accelerator() -> Any:
    """accelerate's Accelerator when installed (multi-GPU via `accelerate launch`), else None."""
    if os.environ.get("GREAM_NO_ACCELERATE"):
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        return None
    return Accelerator()


def is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def build_backbone(cfg: dict[str, Any], tokenizer: Any) -> Any:
    from training.backbone import SCRATCH_PRESETS, ScratchConfig, build_scratch_model, load_pretrained_model

    bb = cfg["backbone"]
    if bb.get("pretrained"):
        dtype = getattr(torch, bb.get("dtype", "float32"))
        model = load_pretrained_model(bb["pretrained"], tokenizer, dtype=dtype)
        if bb.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable()
    else:
        scratch = bb.get("scratch", "tiny")
        sc = SCRATCH_PRESETS[scratch] if isinstance(scratch, str) else ScratchConfig(**scratch)
        model = build_scratch_model(ScratchConfig(**{**sc.to_dict(), "seed": cfg["seed"]}), tokenizer)
    lora = bb.get("lora")
    if lora:
        # New ID tokens need trained embeddings: the embedding and output layers are trained in full.
        import dataclasses

        from peft import LoraConfig, get_peft_model

        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        extra = {"ensure_weight_tying": True} if tied and "ensure_weight_tying" in {
            f.name for f in dataclasses.fields(LoraConfig)} else {}
        model = get_peft_model(model, LoraConfig(
            r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)), lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]),
            modules_to_save=lora.get("modules_to_save", ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]),
            task_type="CAUSAL_LM", **extra))
    return model


def plain_model(model: Any) -> Any:
    """The model to save and serve: LoRA adapters merged into a copy when peft wraps it."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def fit_epochs(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int, epochs: float,
               minutes: float | None, max_steps: int | None = None, probe_steps: int = 2) -> tuple[float, float]:
    """Epochs that fit `minutes`: times `probe_steps` forward/backward passes (weights unchanged) as
    the trainer runs them (bf16 autocast where it would), per token, scaled to the mean padded size
    of the trainer's length-grouped batches."""
    from training.sft import SFTConfig, _collate, padded_tokens_per_step, tokenize_examples, use_bf16

    steps_per_epoch = max(1, math.ceil(len(examples) / batch_size))
    if max_steps:
        epochs = min(epochs, max_steps / steps_per_epoch)
    if not minutes or epochs * steps_per_epoch <= 10:  # a few steps: the time guard is enough
        return epochs, float("nan")
    sample = random.Random(0).sample(list(examples), min(batch_size, len(examples)))
    batch = _collate(tokenize_examples(tokenizer, sample), tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    bf16 = use_bf16(SFTConfig.bf16, device)
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(**batch).loss.backward()  # warm-up: first calls pay for allocations and kernel choice
    start = time.perf_counter()
    for _ in range(probe_steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
    per_token = (time.perf_counter() - start) / probe_steps / batch["input_ids"].numel()
    # x1.25: the optimizer step, collation and Python overhead (measured 0.59 s vs 0.47 s probed).
    per_step = per_token * padded_tokens_per_step(tokenizer, examples, batch_size) * 1.25
    model.zero_grad(set_to_none=True)
    model.eval()
    affordable = minutes * 60 / per_step
    return max(1.0 / steps_per_epoch, min(epochs, affordable / steps_per_epoch)), per_step


def run_sft(model: Any, tokenizer: Any, examples: Sequence[Any], stage_cfg: dict[str, Any], minutes: float | None,
            seed: int, desc: str, accelerator: Any = None, fused: Any = None) -> dict[str, Any]:
    from training.sft import SFTConfig, train_sft

    t = time.perf_counter()
    epochs, per_step = fit_epochs(model, tokenizer, examples, int(stage_cfg["batch_size"]),
                                  float(stage_cfg["epochs"]), minutes, stage_cfg.get("max_steps"))
    if minutes:  # the probe's time comes out of the stage's budget
        minutes = max(0.1, minutes - (time.perf_counter() - t) / 60)
        epochs, _ = fit_epochs(model, tokenizer, examples, int(stage_cfg["batch_size"]), epochs, None)
    # The most the schedule may be re-planned to while training: the preset's epochs and step cap.
    cap, _ = fit_epochs(model, tokenizer, examples, int(stage_cfg["batch_size"]), float(stage_cfg["epochs"]), None,
                        stage_cfg.get("max_steps"))
    cfg = SFTConfig(epochs=epochs, batch_size=int(stage_cfg["batch_size"]), lr=float(stage_cfg["lr"]),
                    max_minutes=minutes, seed=seed, max_epochs=cap)
    stats = train_sft(model, tokenizer, examples, cfg, desc=desc, accelerator=accelerator, fused=fused)
    return {**stats, "probe_s_per_step": per_step, "tasks": _task_counts(examples),
            "fused_objective": None if fused is None else {"mixture_weight": fused.mixture_weight}}


def _task_counts(examples: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.task] = out.get(e.task, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ evaluation


def reasoning_rankings(model: Any, tokenizer: Any, decoder: Any, bundle: Bundle, rows: Sequence[EvalRow],
                       k: int = 10, beams: int = 20, max_new_tokens: int = 96, batch_size: int = 16,
                       max_history: int | None = None, desc: str = "eval reasoning",
                       priors: Sequence[Any] = (None,)) -> tuple[list[list[list[str]]], float]:
    """Reasoning mode: greedy reasoning after THINK_START, then THINK_END ANSWER and the constrained
    top-k IDs (the same beam search and scoring as direct mode). The reasoning is generated once and
    the answer decoded once per entry of `priors` (None: the model alone). Returns one list of
    rankings per prior and the share of rows whose reasoning was closed by THINK_END (format rate)."""
    from tqdm.auto import tqdm

    from training.evaluate import prior_biases
    from training.srpo import generate_reasoning
    from training.tasks import spell_history

    max_history = max_history or bundle.prompt_history or 10
    suffix = tokenizer(tokens.reasoning_answer_suffix(), add_special_tokens=False)["input_ids"]
    ranked: list[list[list[str]]] = [[] for _ in priors]
    closed_total = 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = rows[start: start + batch_size]
        prompts = [tokens.reasoning_prompt(spell_history(bundle, r.history[-max_history:])) for r in chunk]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        reasoning, closed = generate_reasoning(model, tokenizer, prompt_ids, max_new_tokens)
        closed_total += sum(closed)
        ids = [p + r + suffix for p, r in zip(prompt_ids, reasoning, strict=True)]
        for out, prior in zip(ranked, priors, strict=True):
            results = decoder.topk([""] * len(ids), [k] * len(ids), [beams] * len(ids), prompt_ids=ids,
                                   biases=prior_biases(bundle, prior, chunk))
            out += [[bundle.items[s.index].item_id for s in res] for res in results]
    return ranked, closed_total / max(1, len(rows))


def evaluate_modes(model: Any, tokenizer: Any, bundle: Bundle, rows: Sequence[EvalRow], modes: Sequence[str],
                   label: str, beams: int = 20, k: int = 10, reasoning_rows: int | None = None,
                   reasoning_tokens: int = 96, prior: Any = None,
                   variants: Sequence[tuple[str, Any]] | None = None,
                   max_history: int | None = None) -> dict[str, dict[str, float]]:
    """{"<label> (direct)": metrics, "<label> (reasoning)": metrics} with the service's decoder, fused
    with the collaborative prior `prior` (model_store.prior) when given. `variants` [(label, prior)]
    evaluates several priors (None: the model alone) with one reasoning generation per row."""
    from service.engine.shared_prefix import make_decoder
    from training.evaluate import model_rankings, ranking_metrics

    variants = list(variants) if variants is not None else [(label, prior)]
    model.eval()
    decoder = make_decoder(model, tokenizer, bundle.trie, tokens.id_token_ids(tokenizer, bundle.id_format))
    out: dict[str, dict[str, float]] = {}
    if "direct" in modes:
        for name, p in variants:
            ranked = model_rankings(decoder, bundle, rows, k=k, beams=beams, desc=f"eval {name} direct", prior=p,
                                    max_history=max_history)
            out[f"{name} (direct)"] = ranking_metrics(ranked, [r.target for r in rows])
    if "reasoning" in modes:
        sub = list(rows[:reasoning_rows]) if reasoning_rows else list(rows)
        rankings, fmt = reasoning_rankings(model, tokenizer, decoder, bundle, sub, k=k, beams=beams,
                                           max_new_tokens=reasoning_tokens, desc=f"eval {label} reasoning",
                                           priors=[p for _, p in variants], max_history=max_history)
        for (name, _), ranked in zip(variants, rankings, strict=True):
            out[f"{name} (reasoning)"] = {**ranking_metrics(ranked, [r.target for r in sub]), "format_rate": fmt,
                                          "rows": len(sub)}
    return out


# ------------------------------------------------------------------------------------------ recipe


def prepare_ids(data_dir: Path, items_path: Path, cfg: dict[str, Any], workdir: Path, log: Callable[[str], None]
                ) -> Bundle:
    """Semantic IDs for the catalog (a bundle without model in `workdir`)."""
    from model_store.builder import BuildConfig, build_bundle
    from model_store.semantic_ids import DEFAULT_EMBEDDER, QuantizerConfig

    ids = cfg["ids"]
    q = QuantizerConfig(levels=int(ids["levels"]), codebook_size=int(ids["codebook_size"]),
                        dedup_size=int(ids.get("dedup_size", ids["codebook_size"])), seed=int(cfg["seed"]),
                        balanced=bool(ids.get("balanced", True)))
    build = BuildConfig(quantizer=q, embedder=ids.get("embedder", DEFAULT_EMBEDDER),
                        tokenizer=cfg["backbone"].get("tokenizer") or cfg["backbone"].get("pretrained"),
                        tokenizer_vocab_size=int(cfg["tokenizer"]["vocab_size"]))
    build_bundle(items_path, workdir / "ids", build, interactions=data_dir / "train.jsonl", overwrite=True, log=log)
    return load_bundle(workdir / "ids")


def make_tokenizer(ids_bundle: Bundle, cfg: dict[str, Any], train: dict[str, list[str]], with_reasoning: bool) -> Any:
    """The ID bundle's tokenizer, or for scratch models one retrained with the reasoning templates' words."""
    from transformers import AutoTokenizer

    from model_store.tokenizer import train_catalog_tokenizer
    from training.curriculum import tokenizer_corpus

    bb = cfg["backbone"]
    if bb.get("pretrained") or bb.get("tokenizer") or not with_reasoning:
        return AutoTokenizer.from_pretrained(str(ids_bundle.tokenizer_path), local_files_only=True)
    texts = [t for it in ids_bundle.items for t in (it.title, it.brand, it.categories) if t]
    corpus = tokenizer_corpus(ids_bundle, train, n=400, seed=int(cfg["seed"]))
    return train_catalog_tokenizer(texts + corpus * 3, ids_bundle.id_format, vocab_size=int(cfg["tokenizer"]["vocab_size"]))


def fit_prior(ids_bundle: Bundle, train: dict[str, list[str]], valid: Sequence[EvalRow],
              prior_cfg: dict[str, Any] | None, log: Callable[[str], None]) -> Any:
    """The collaborative prior the bundle ships (None when disabled): transition weights tuned on valid
    rows against train cut before them (and counts or probabilities), counts from `train`, fusion and
    floor from the config."""
    from model_store.prior import PriorSettings, TransitionPrior
    from training.baselines import WeightedTransitionBaseline
    from training.tasks import holdout_sequences

    prior_cfg = prior_cfg or {}
    if not prior_cfg.get("enabled", False):
        return None
    settings = PriorSettings.from_config(prior_cfg)
    if prior_cfg.get("tune_weights", True) and valid:
        cut = holdout_sequences(train, valid)
        tuned, ndcg = WeightedTransitionBaseline.tune(cut, valid)
        settings = replace(settings, weights=tuned["weights"], normalise_rows=tuned["normalise_rows"])
        log(f"[prior] transition weights {list(tuned['weights'])}, "
            f"{'per-item probabilities' if tuned['normalise_rows'] else 'counts'} (valid NDCG@10 {ndcg:.4f} alone)")
        if prior_cfg.get("tune_history", True):
            history, ndcg = WeightedTransitionBaseline.tune_history(cut, valid, tuned)
            settings = replace(settings, **history)
            log(f"[prior] earlier history items weight {history['history_weight']:g}, decay "
                f"{history['history_decay']:g} (valid NDCG@10 {ndcg:.4f} alone)")
    index = ids_bundle.index_of
    return TransitionPrior.fit(([index[i] for i in seq if i in index] for seq in train.values()),
                               len(ids_bundle.items), settings)


def fused_objective(align_cfg: dict[str, Any], prior: Any, tokenizer: Any, ids_bundle: Bundle) -> Any:
    """The SFT trainer's FusedObjective when the config asks for it (`align.fused_objective`: true, or
    the prior weight to train for), else None; it needs the bundle's prior with mixture fusion, the
    distribution the service decodes from."""
    from training.sft import FusedObjective

    setting = align_cfg.get("fused_objective", False)
    if not setting:
        return None
    if prior is None or prior.settings.fusion != "mixture":
        raise ValueError("align.fused_objective needs the collaborative prior with mixture fusion "
                         "(prior.enabled = true, prior.fusion = \"mixture\")")
    # true: train for the mixture weight the bundle serves; a number: train for that weight.
    weight = prior.settings.mixture_weight if setting is True else float(setting)
    if not 0 < weight < 1:
        raise ValueError(f"align.fused_objective must be true, false or a prior weight in (0, 1), got {setting!r}")
    return FusedObjective(weight, frozenset(tokens.id_token_ids(tokenizer, ids_bundle.id_format)),
                          ids_bundle.id_format.depth)


def _save(out: Path, ids_bundle: Bundle, tokenizer: Any, model: Any, stats: dict[str, Any],
          prior: Any, prompt_history: int) -> Path:
    # The service reads `prompt_history` so its prompts hold the history window the model was trained on.
    settings = {**ids_bundle.manifest["settings"], "prompt_history": prompt_history}
    return save_bundle(out, items=ids_bundle.items, codes=ids_bundle.codes, codebooks=ids_bundle.codebooks,
                       id_format=ids_bundle.id_format, tokenizer=tokenizer, model=plain_model(model),
                       popularity=ids_bundle.popularity, settings=settings,
                       stats={**ids_bundle.manifest["stats"], "training": stats}, prior=prior, overwrite=True)


def run_recipe(data_dir: str | Path, out: str | Path, config: str | dict[str, Any] | None = "small",
               stages: Sequence[str] = STAGE_ORDER, max_minutes: float | None = 60.0,
               items_path: str | Path | None = None, teacher_url: str | None = None,
               teacher_model: str = "default", log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Train with the recipe and write the bundle to `out`; returns its path and the training stats."""
    from training.curriculum import CurriculumConfig, TeacherClient, ThemeIndex, curriculum_examples
    from training.srpo import SRPOConfig, frozen_copy, srpo_rows, train_srpo
    from training.tasks import alignment_examples, holdout_sequences, mix_examples

    t0 = time.perf_counter()
    cfg = load_config(config)
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown or not stages:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGE_ORDER)}")
    stages = [s for s in STAGE_ORDER if s in stages]  # always in recipe order
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    data_dir, out = Path(data_dir), Path(out)
    items_path = Path(items_path) if items_path else data_dir / "items.jsonl"
    data = InteractionData.load(data_dir)
    train = holdout_sequences(data.train, data.valid) if cfg.get("holdout_valid") else data.train
    valid_rows = data.valid[: int(cfg["eval"]["valid_rows"])]
    accelerator = make_accelerator()
    main = is_main(accelerator)
    timings: dict[str, float] = {}
    stats: dict[str, Any] = {"kind": "gream-recipe", "config": cfg, "stages": stages, "max_minutes": max_minutes,
                             "data": str(data_dir), "holdout_valid": bool(cfg.get("holdout_valid")),
                             "valid_rows": len(valid_rows), "stage_stats": {}, "valid": {}, "stage_bundles": {}}

    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}-work-", dir=out.parent))
    try:
        t = time.perf_counter()
        log(f"[prepare] semantic IDs for {items_path}")
        ids_bundle = prepare_ids(data_dir, items_path, cfg, workdir, log)
        prior = fit_prior(ids_bundle, train, data.valid, cfg.get("prior"), log)
        tokenizer = make_tokenizer(ids_bundle, cfg, train, with_reasoning="reason" in stages)
        model = build_backbone(cfg, tokenizer)
        if accelerator is not None:
            model = model.to(accelerator.device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[prepare] {len(ids_bundle.items)} items, ID depth {ids_bundle.id_format.depth}, vocabulary "
            f"{len(tokenizer)}, model {n_params / 1e6:.1f}M parameters")
        timings["prepare_s"] = time.perf_counter() - t
        stats["model_parameters"] = n_params

        budget = cfg["budget"]
        deadline = t0 + max_minutes * 60 if max_minutes else None

        def stage_minutes(stage: str) -> float | None:
            """The stage's share of the time left (evaluation reserve kept back), decided when it starts,
            so overruns of earlier stages (probes, evaluations, snapshots) are absorbed by later ones."""
            if deadline is None:
                return None
            left = [s for s in stages if s not in stats["stage_minutes"]]
            share = float(budget[stage]) / sum(float(budget[s]) for s in left)
            minutes = max(0.2, (deadline - time.perf_counter()) / 60 * (1 - float(budget.get("eval_reserve", 0.1)))
                          * share)
            stats["stage_minutes"][stage] = minutes
            return minutes

        stats["stage_minutes"] = {}
        train_minutes: dict[str, float | None] = {}
        ev = cfg["eval"]

        def measure(stage: str, modes: Sequence[str]) -> dict[str, dict[str, float]]:
            if not main or not valid_rows:
                return {}
            t_eval = time.perf_counter()
            res = evaluate_modes(plain_model(model), tokenizer, ids_bundle, valid_rows, modes, STAGE_LABELS[stage],
                                 beams=int(ev["beams"]), reasoning_rows=int(ev["reasoning_rows"]),
                                 reasoning_tokens=int(ev["reasoning_tokens"]), max_history=max_history)
            timings[f"{stage}_valid_eval_s"] = time.perf_counter() - t_eval
            for name, m in res.items():
                log(f"[valid] {name}: HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f}")
            stats["valid"].update(res)
            return res

        def snapshot(stage: str) -> None:
            if main and cfg.get("stage_bundles", True):
                path = _save(Path(f"{out}.stages") / stage, ids_bundle, tokenizer, model,
                             {"kind": "gream-recipe-stage", "stage": stage, "label": STAGE_LABELS[stage]}, prior,
                             max_history)
                stats["stage_bundles"][stage] = os.path.relpath(path, out)

        align_cfg = cfg["align"]
        max_history = int(align_cfg.get("max_history", 10))
        fused = fused_objective(align_cfg, prior, tokenizer, ids_bundle)
        if fused is not None:
            log(f"[align] fused objective: the model learns the mixture w * prior + (1 - w) * model, w = "
                f"{fused.mixture_weight:g}, against held-out prior probabilities")
        align_examples = alignment_examples(ids_bundle, train, align_cfg.get("weights"), max_history, seed,
                                            bool(align_cfg.get("dense_history", True)),
                                            prior if fused is not None else None)

        if "align" in stages:
            t = time.perf_counter()
            train_minutes["align"] = stage_minutes("align")
            align_minutes = train_minutes["align"]
            log(f"[align] {len(align_examples)} examples, "
                + (f"{align_minutes:.1f} min budget" if align_minutes else "no time budget"))
            stats["stage_stats"]["align"] = run_sft(model, tokenizer, align_examples, align_cfg, train_minutes["align"],
                                                    seed, "align", accelerator, fused)
            timings["align_s"] = time.perf_counter() - t
            measure("align", ["direct"])
            snapshot("align")

        if "reason" in stages:
            t = time.perf_counter()
            train_minutes["reason"] = stage_minutes("reason")
            rc = cfg["reason"]
            ccfg = CurriculumConfig(max_history=max_history, max_examples=rc.get("max_examples"), seed=seed)
            themes = ThemeIndex(ids_bundle, train)
            teacher = TeacherClient(teacher_url, teacher_model, os.environ.get("GREAM_TEACHER_API_KEY")) \
                if teacher_url else None
            per_stage = None if train_minutes["reason"] is None else train_minutes["reason"] / len(tokens.REASONING_STAGES)
            sub_stats = []
            for s in range(1, len(tokens.REASONING_STAGES) + 1):
                examples = curriculum_examples(ids_bundle, train, s, ccfg, themes, teacher)
                replay = mix_examples({"align": align_examples},
                                      {"align": min(1.0, float(rc.get("align_replay", 0.5)) * len(examples)
                                                    / max(1, len(align_examples)))}, seed + s)
                mixed = mix_examples({"reason": examples, "replay": replay}, {"reason": 1.0, "replay": 1.0}, seed + s)
                log(f"[reason {s}/5: +{tokens.REASONING_STAGES[s - 1]}] {len(examples)} reasoning + "
                    f"{len(replay)} replayed alignment examples")
                sub_stats.append(run_sft(model, tokenizer, mixed, rc, per_stage, seed + s, f"reason {s}/5", accelerator,
                                         fused))
            stats["stage_stats"]["reason"] = {"substages": sub_stats,
                                              "teacher_failures": teacher.failures if teacher else None}
            timings["reason_s"] = time.perf_counter() - t
            measure("reason", ["direct", "reasoning"])
            snapshot("reason")

        if "srpo" in stages:
            t = time.perf_counter()
            train_minutes["srpo"] = stage_minutes("srpo")
            sc = SRPOConfig(**{**cfg["srpo"], "max_minutes": train_minutes["srpo"], "seed": seed,
                               "max_history": max_history})
            before = copy.deepcopy(model.state_dict()) if cfg.get("select_on_valid") else None
            ref = None if hasattr(model, "disable_adapter") else frozen_copy(model)
            rows = srpo_rows(ids_bundle, train, max_history)
            log(f"[srpo] {len(rows)} prompts, mode {sc.mode}, G={sc.group_size}")
            stats["stage_stats"]["srpo"] = train_srpo(model, ref, tokenizer, ids_bundle, rows, sc,
                                                      tokens.id_token_ids(tokenizer, ids_bundle.id_format),
                                                      accelerator=accelerator)
            del ref
            if accelerator is not None:
                model = accelerator.unwrap_model(model)
            timings["srpo_s"] = time.perf_counter() - t
            prev = STAGE_LABELS["reason" if "reason" in stages else "align"] + " (direct)"
            res = measure("srpo", ["direct", "reasoning"] if sc.mode == "reasoning" else ["direct"])
            snapshot("srpo")
            new = res.get(f"{STAGE_LABELS['srpo']} (direct)")
            old = stats["valid"].get(prev)
            if before is not None and new and old and new["NDCG@10"] < old["NDCG@10"]:
                log(f"[srpo] valid NDCG@10 fell ({old['NDCG@10']:.4f} -> {new['NDCG@10']:.4f}): "
                    "keeping the pre-SRPO weights in the bundle (select_on_valid)")
                model.load_state_dict(before)
                stats["srpo_reverted"] = True

        if prior is not None and main and valid_rows:
            t = time.perf_counter()
            last = STAGE_LABELS[stages[-1]]
            # Valid targets are inside train.jsonl: the prior shipped counts them, so measure with one
            # counted on train cut before the valid rows (same settings), or valid would flatter it.
            index = ids_bundle.index_of
            valid_prior = prior.refit([index[i] for i in seq if i in index]
                                       for seq in holdout_sequences(train, data.valid).values())
            res = evaluate_modes(plain_model(model), tokenizer, ids_bundle, valid_rows, ["direct"], f"{last} +prior",
                                 beams=int(ev["beams"]), prior=valid_prior, max_history=max_history)
            timings["prior_valid_eval_s"] = time.perf_counter() - t
            for name, m in res.items():
                log(f"[valid] {name}: HR@10 {m['HR@10']:.4f} NDCG@10 {m['NDCG@10']:.4f}")
            stats["valid"].update(res)
        timings["total_s"] = time.perf_counter() - t0
        stats["timings"] = timings
        path = out
        if main:
            path = _save(out, ids_bundle, tokenizer, model, stats, prior, max_history)
            log(f"[done] bundle -> {path} in {timings['total_s'] / 60:.1f} min")
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return path, stats
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def stage_bundle_paths(bundle: Bundle) -> dict[str, Path]:
    """The per-stage snapshot bundles recorded in a recipe bundle's manifest (those still present)."""
    recorded = bundle.manifest.get("stats", {}).get("training", {}).get("stage_bundles", {})
    return {stage: (bundle.path / rel).resolve() for stage, rel in recorded.items()
            if (bundle.path / rel / "manifest.json").is_file()}
