"""`gream eval`: one report in which every row of a table is measured on the same rows.

The headline row is what the service returns: the bundle's model fused with its prior, decoded with the
service's beam width and with the history's items excluded (the API's `exclude_seen` default). Next to
it: each stage's LM alone, each stage fused with the prior (eval protocol: wider beams, history kept, as
the baselines rank), the prior alone and every baseline, tuned on valid in the same run; then a paired
bootstrap of the served row against the best baseline. Reasoning mode, when asked for on fewer rows,
gets its own table with direct mode on those same rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data import EvalRow, InteractionData
from training.evaluate import PRIOR_ALONE, prior_rankings, ranking_metrics

SERVED = "served"


@dataclass(frozen=True)
class EvalOptions:
    modes: Sequence[str] = ("direct",)
    with_stages: bool = False
    prior: str = "both"  # both | off | only
    beams: int = 20
    served_beams: int = 10
    sasrec: bool = True
    reasoning_limit: int | None = None
    reasoning_tokens: int = 256
    prior_variants: Any = None  # callable (label, prior) -> [(label, prior)] for tuning grids


def ndcg_per_row(ranked: Sequence[Sequence[str]], targets: Sequence[str], k: int = 10) -> np.ndarray:
    """Each row's NDCG@k (one relevant item): 1 / log2(rank + 2) when the target is in the top k."""
    out = np.zeros(len(targets))
    for n, (items, target) in enumerate(zip(ranked, targets, strict=True)):
        rank = next((r for r, item in enumerate(items[:k]) if item == target), None)
        if rank is not None:
            out[n] = 1 / math.log2(rank + 2)
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over rows and its 95 % percentile interval, resampling rows with replacement."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95_low": float(lo), "ci95_high": float(hi), "samples": samples}


def served_label(stage_label: str, beams: int) -> str:
    return f"{SERVED} ({stage_label} +prior, {beams} beams, history excluded)"


def evaluate_bundle(bundle: Any, data: InteractionData, rows: Sequence[EvalRow], split: str, opts: EvalOptions,
                    log: Any = print) -> dict[str, Any]:
    """The report of `gream eval` (JSON-ready): metrics by row name, the served row's name, the
    bootstrap comparison and the evaluation times."""
    from training.baselines import baseline_rankings
    from training.tasks import holdout_sequences

    targets = [r.target for r in rows]
    metrics: dict[str, dict[str, Any]] = {}
    per_row: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    served = None
    if bundle is not None:
        served = _model_rows(bundle, rows, opts, metrics, per_row, timings, log)
    if bundle is not None and bundle.prior is not None and opts.prior != "off":
        # What the model adds: the same prior ranking on its own, as a baseline would.
        ranked = prior_rankings(bundle, bundle.prior, rows)
        metrics[PRIOR_ALONE] = ranking_metrics(ranked, targets)
        per_row[PRIOR_ALONE] = ndcg_per_row(ranked, targets)
    # Valid targets are inside train.jsonl: on valid, the baselines count train cut before the valid rows.
    base_train = holdout_sequences(data.train, data.valid) if split == "valid" else data.train
    for name, (ranked, extras) in baseline_rankings(base_train, rows, 10, valid=data.valid,
                                                    sasrec=opts.sasrec).items():
        metrics[name] = {**ranking_metrics(ranked, targets), **extras}
        per_row[name] = ndcg_per_row(ranked, targets)
    report: dict[str, Any] = {"split": split, "rows": len(rows), "beams": opts.beams,
                              "served_beams": opts.served_beams, "modes": list(opts.modes), "served": served,
                              "metrics": metrics, "eval_seconds": timings}
    if served is not None:
        others = [n for n in per_row if n != served and not n.endswith(")")]
        best = max(others, key=lambda n: metrics[n]["NDCG@10"])
        report["served_vs_best_baseline"] = {"baseline": best, "metric": "NDCG@10",
                                             **paired_bootstrap(per_row[served], per_row[best])}
    return report


def _model_rows(bundle: Any, rows: Sequence[EvalRow], opts: EvalOptions, metrics: dict[str, Any],
                per_row: dict[str, np.ndarray], timings: dict[str, float], log: Any) -> str | None:
    """Each stage's rows (or the bundle's alone) added to `metrics`; the served row last. Returns the
    served row's name (None when the bundle has no model)."""
    from transformers import AutoTokenizer

    from model_store import tokens
    from model_store.bundle import load_bundle
    from model_store.model import load_bundle_model
    from service.engine.shared_prefix import make_decoder  # the service's own decoder
    from training.config import STAGE_LABELS
    from training.evaluate import evaluate_modes, model_rankings
    from training.stages.validation import stage_bundle_paths

    if not bundle.has_model:
        return None
    targets_list: list[tuple[str, Any]] = []
    if opts.with_stages:
        targets_list += [(STAGE_LABELS.get(stage, stage), load_bundle(path))
                         for stage, path in stage_bundle_paths(bundle).items()]
        if not targets_list:
            log("no stage bundles recorded in this bundle's manifest; evaluating the bundle alone")
    if not targets_list:
        targets_list = [("model", bundle)]
    loaded: dict[str, tuple[Any, Any]] = {}

    def tokenizer_and_model(b: Any) -> tuple[Any, Any]:
        # Without --with-stages the served row decodes the model the stage rows just loaded.
        key = str(b.model_path)
        if key not in loaded:
            loaded[key] = (AutoTokenizer.from_pretrained(str(b.tokenizer_path)), load_bundle_model(b.model_path))
        return loaded[key]

    for label, b in targets_list:
        t = time.perf_counter()
        tokenizer, model = tokenizer_and_model(b)
        stage_modes = list(opts.modes) if (label != STAGE_LABELS["align"] or not opts.with_stages) else ["direct"]
        variants = [(label, None)] if opts.prior != "only" or b.prior is None else []
        if b.prior is not None and opts.prior != "off":
            variants += opts.prior_variants(label, b.prior) if opts.prior_variants else [(f"{label} +prior", b.prior)]
        metrics.update(evaluate_modes(model, tokenizer, b, rows, stage_modes, label, beams=opts.beams,
                                      reasoning_rows=opts.reasoning_limit, reasoning_tokens=opts.reasoning_tokens,
                                      variants=variants))
        timings[label] = time.perf_counter() - t
    # The served row: the bundle itself, as the gateway decodes it by default.
    t = time.perf_counter()
    tokenizer, model = tokenizer_and_model(bundle)
    decoder = make_decoder(model, tokenizer, bundle.trie, tokens.id_token_ids(tokenizer, bundle.id_format))
    stage = bundle.manifest.get("stats", {}).get("training", {}).get("stages", [None])[-1]
    name = served_label(STAGE_LABELS.get(stage, "model"), opts.served_beams)
    if bundle.prior is None:
        name = name.replace(" +prior", "")
    ranked = model_rankings(decoder, bundle, rows, k=10, beams=opts.served_beams, desc="eval served",
                            prior=bundle.prior, exclude_seen=True)
    targets = [r.target for r in rows]
    metrics[name] = ranking_metrics(ranked, targets)
    per_row[name] = ndcg_per_row(ranked, targets)
    timings[SERVED] = time.perf_counter() - t
    return name


def print_report(report: dict[str, Any], log: Any = print) -> None:
    """The main table (all rows), the same-subset table of reasoning mode, the chain figures and the
    bootstrap line."""
    from training.evaluate import format_table

    metrics = report["metrics"]
    on_all = [n for n, m in metrics.items() if m.get("rows", report["rows"]) == report["rows"]]
    full = {n: {k: v for k, v in metrics[n].items() if "@" in k} for n in on_all}
    subset = {n: {k: v for k, v in m.items() if "@" in k} for n, m in metrics.items() if n not in on_all}
    log(f"{report['split']}, {report['rows']:,} rows; history items excluded only in the served row")
    log(format_table(full))
    if subset:
        n = next(iter(m["rows"] for m in metrics.values() if "rows" in m))
        log(f"\nreasoning against direct mode on the same first {n:,} rows")
        log(format_table(subset))
    for name, m in metrics.items():
        if "grounded_share" in m:  # reasoning mode: how faithful and well-formed the chains were
            log(f"{name}: grounded {m['grounded_share']:.3f}, closed within budget "
                f"{m['closed_within_budget_share']:.3f}, repeated 4-gram rate {m['repeated_4gram_rate']:.4f}, "
                f"mean reasoning tokens {m['mean_reasoning_tokens']:.1f}, time to first token "
                f"{m['time_to_first_token_ms']:.0f} ms (batched)")
    cmp = report.get("served_vs_best_baseline")
    if cmp:
        log(f"\nserved - {cmp['baseline']}, NDCG@10: {cmp['mean']:+.4f} (95 % paired bootstrap "
            f"[{cmp['ci95_low']:+.4f}, {cmp['ci95_high']:+.4f}], {cmp['samples']} resamples)")
