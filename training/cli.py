"""Training-side subcommands of `gream` (kept here so the gateway never imports training code).

    gream train --data DIR --out BUNDLE [--config PRESET|FILE|JSON] [--stages align,reason,srpo]
                [--max-minutes N] [--items ITEMS.jsonl] [--teacher-url URL]
    gream prior --bundle BUNDLE --data DIR --out NEW_BUNDLE [--fusion mixture|product] [--mixture-weight W]
                [--strength S] [--floor F] [--holdout-valid] [--with-stages]
    gream eval --bundle BUNDLE --data DIR [--mode direct|reasoning|both] [--with-stages]
               [--prior both|off|only] [--report OUT.json] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from model_store.prior import PriorSettings


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from training.recipe import run_recipe

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    path, stats = run_recipe(args.data, args.out, config=args.config, stages=stages, max_minutes=args.max_minutes,
                             items_path=args.items, teacher_url=args.teacher_url, teacher_model=args.teacher_model,
                             log=_log)
    summary = {"bundle": str(path), "timings": stats.get("timings"), "valid": stats.get("valid"),
               "stage_bundles": stats.get("stage_bundles")}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from model_store.bundle import load_bundle
    from model_store.model import load_bundle_model
    from training.baselines import baseline_rows
    from training.config import STAGE_LABELS
    from training.data import InteractionData
    from training.evaluate import PRIOR_ALONE, evaluate_modes, format_table, prior_rankings, ranking_metrics
    from training.stages.validation import stage_bundle_paths

    if args.bundle is None and not args.baselines_only:
        _log("gream eval: --bundle is required (or --baselines-only)")
        return 2
    bundle = None if args.baselines_only else load_bundle(args.bundle)
    data = InteractionData.load(args.data)
    split = data.valid if args.split == "valid" else data.test
    rows = split[: args.limit] if args.limit else split
    modes = ["direct", "reasoning"] if args.mode == "both" else [args.mode]
    targets: list[tuple[str, object]] = []
    if bundle is not None and args.with_stages:
        targets += [(STAGE_LABELS.get(stage, stage), load_bundle(path))
                    for stage, path in stage_bundle_paths(bundle).items()]
        if not targets:
            _log("no stage bundles recorded in this bundle's manifest; evaluating the bundle alone")
    if not targets and bundle is not None:
        targets = [("model", bundle)]
    metrics: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for label, b in targets:
        t = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(b.tokenizer_path))
        model = load_bundle_model(b.model_path)
        stage_modes = modes if (label != STAGE_LABELS["align"] or not args.with_stages) else ["direct"]
        variants = [(label, None)] if args.prior != "only" or b.prior is None else []
        if b.prior is not None and args.prior != "off":
            variants += prior_variants(label, b.prior, args.prior_strengths, args.prior_floors, args.prior_mixtures)
        metrics.update(evaluate_modes(model, tokenizer, b, rows, stage_modes, label, beams=args.beams,
                                      reasoning_rows=args.reasoning_limit, reasoning_tokens=args.reasoning_tokens,
                                      variants=variants))
        timings[label] = time.perf_counter() - t
    if args.split == "valid":
        from training.tasks import holdout_sequences

        # Valid targets are inside train.jsonl: count the baselines on train cut before the valid rows.
        base_train = holdout_sequences(data.train, data.valid)
    else:
        base_train = data.train
    if bundle is not None and bundle.prior is not None and args.prior != "off":
        # What the model adds: the same prior ranking on its own, as a baseline would.
        metrics[PRIOR_ALONE] = ranking_metrics(prior_rankings(bundle, bundle.prior, rows), [r.target for r in rows])
    metrics.update(baseline_rows(base_train, rows, 10, valid=data.valid, sasrec=not args.no_sasrec))
    print(format_table({n: {k: v for k, v in m.items() if "@" in k} for n, m in metrics.items()}))
    for name, m in metrics.items():
        if "grounded_share" in m:  # reasoning mode: how faithful and well-formed the chains were
            print(f"{name}: grounded {m['grounded_share']:.3f}, closed within budget "
                  f"{m['closed_within_budget_share']:.3f}, repeated 4-gram rate {m['repeated_4gram_rate']:.4f}, "
                  f"mean reasoning tokens {m['mean_reasoning_tokens']:.1f}, time to first token "
                  f"{m['time_to_first_token_ms']:.0f} ms (batched)")
    report = {"bundle": bundle.version if bundle else None, "split": args.split, "rows": len(rows), "beams": args.beams, "modes": modes,
              "metrics": metrics, "eval_seconds": timings,
              "training_timings": bundle.manifest.get("stats", {}).get("training", {}).get("timings") if bundle else None}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
        _log(f"report -> {args.report}")
    if args.plot:
        from training.plot import plot_report

        plot_report(metrics, args.plot)
        _log(f"plot -> {args.plot}")
    return 0


def cmd_prior(args: argparse.Namespace) -> int:
    """A new bundle version with the collaborative prior refitted from DATA (same model and IDs); with
    --with-stages, the recipe's stage snapshots get the same prior, so one eval compares every stage."""
    from model_store.bundle import load_bundle
    from training.config import PriorSection
    from training.data import InteractionData
    from training.stages.prepare import fit_prior
    from training.stages.validation import stage_bundle_paths
    from training.tasks import holdout_sequences

    bundle = load_bundle(args.bundle)
    stages = stage_bundle_paths(bundle) if args.with_stages else {}
    if args.with_stages and not stages:
        _log(f"gream prior: {args.bundle} records no stage bundles (--with-stages needs a `gream train` bundle)")
        return 2
    data = InteractionData.load(args.data)
    train = holdout_sequences(data.train, data.valid) if args.holdout_valid else data.train
    # The bundle's own fusion settings stay unless given; --strength alone asks for the product fusion.
    kept = {k: v for k, v in (bundle.prior.settings.to_dict() if bundle.prior else {}).items()
            if k in ("fusion", "strength", "mixture_weight", "floor")}
    fusion = args.fusion or ("product" if args.strength is not None else kept.get("fusion", PriorSettings().fusion))
    given = (("strength", args.strength), ("floor", args.floor), ("mixture_weight", args.mixture_weight))
    section = PriorSection(**{**kept, "enabled": True, "tune_weights": not args.no_tune, "fusion": fusion,
                              **{k: v for k, v in given if v is not None}})
    prior = fit_prior(bundle, train, data.valid, section, _log)
    refit = {"data": str(args.data), "parent_bundle": bundle.version, "holdout_valid": args.holdout_valid}
    snapshots = {stage: os.path.relpath(_with_prior(load_bundle(path), Path(f"{args.out}.stages") / stage, prior,
                                                    refit, args.overwrite), args.out)
                 for stage, path in stages.items()}
    stats = {**bundle.manifest.get("stats", {}), "prior_refit": refit}
    if snapshots:
        stats["training"] = {**stats.get("training", {}), "stage_bundles": snapshots}
    path = _with_prior(bundle, Path(args.out), prior, refit, args.overwrite, stats)
    print(json.dumps({"bundle": str(path), "prior": prior.settings.to_dict(), "stage_bundles": snapshots}, indent=2))
    return 0


def _with_prior(bundle: Any, out: Path, prior: Any, refit: dict[str, Any], overwrite: bool,
                stats: dict[str, Any] | None = None) -> Path:
    """`bundle` saved to `out` as a new version with `prior` in place of its own; its manifest stats
    gain `prior_refit` unless `stats` replaces them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_store.bundle import save_bundle

    tokenizer = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(bundle.model_path), local_files_only=True) \
        if bundle.has_model else None
    stats = stats if stats is not None else {**bundle.manifest.get("stats", {}), "prior_refit": refit}
    return save_bundle(out, items=bundle.items, codes=bundle.codes, codebooks=bundle.codebooks,
                       id_format=bundle.id_format, tokenizer=tokenizer, model=model, popularity=bundle.popularity,
                       settings=bundle.manifest.get("settings"), stats=stats, prior=prior, overwrite=overwrite)


def _floats(text: str | None) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()] if text else []


def prior_variants(label: str, prior: Any, strengths: str | None, floors: str | None,
                   mixtures: str | None = None) -> list[tuple[str, Any]]:
    """The bundle's prior, or one variant per setting asked for (tuning on valid): product fusion at
    each strength x floor, mixture fusion at each prior weight x floor."""
    floor_grid = _floats(floors) or [None]
    grid: list[dict[str, Any]] = [{"fusion": "product", "strength": s} for s in _floats(strengths)]
    grid += [{"fusion": "mixture", "mixture_weight": w} for w in _floats(mixtures)]
    if not grid and floor_grid == [None]:
        return [(f"{label} +prior", prior)]
    out = []
    for changes in grid or [{}]:
        for floor in floor_grid:
            variant = prior.with_settings(**changes, **({} if floor is None else {"floor": floor}))
            st = variant.settings
            what = f"mixture={st.mixture_weight:g}" if st.fusion == "mixture" else f"strength={st.strength:g}"
            out.append((f"{label} +prior({what}, floor={st.floor:g})", variant))
    return out


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train with the GREAM recipe (align -> reason -> srpo) into a bundle")
    tr.add_argument("--data", required=True, help="folder with items.jsonl, train.jsonl, valid.jsonl")
    tr.add_argument("--out", required=True, help="bundle folder to write (replaced if present)")
    tr.add_argument("--config", default="small",
                    help="preset (training/presets: demo, small, tiny), a TOML/JSON file or an inline JSON object; "
                         "a file or object may set base=<preset> and override its keys (unknown keys are errors)")
    tr.add_argument("--stages", default="align,reason,srpo", help="comma-separated subset of align,reason,srpo")
    tr.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock budget of the whole run")
    tr.add_argument("--items", default=None, help="catalog (default: DATA/items.jsonl)")
    tr.add_argument("--teacher-url", default=None,
                    help="OpenAI-compatible endpoint (e.g. http://host:8000/v1) to write the reasoning; "
                         "key from $GREAM_TEACHER_API_KEY; default: offline templates")
    tr.add_argument("--teacher-model", default="default", help="model name sent to the teacher endpoint")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("prior", help="refit a bundle's collaborative prior from fresh interactions (new version)")
    pr.add_argument("--bundle", required=True)
    pr.add_argument("--data", required=True, help="folder with train.jsonl and valid.jsonl")
    pr.add_argument("--out", required=True, help="bundle folder to write")
    pr.add_argument("--fusion", choices=["mixture", "product"], default=None,
                    help="how decoding fuses the prior with the model (default: the bundle's, else "
                         f"{PriorSettings().fusion})")
    pr.add_argument("--mixture-weight", type=float, default=None,
                    help="mixture fusion: the prior's share (default: the bundle's, else "
                         f"{PriorSettings().mixture_weight:g})")
    pr.add_argument("--strength", type=float, default=None,
                    help="product fusion: weight of log p_prior (default: the bundle's, else "
                         f"{PriorSettings().strength:g})")
    pr.add_argument("--floor", type=float, default=None,
                    help="uniform share of the prior's mass (default: the bundle's, else "
                         f"{PriorSettings().floor:g})")
    pr.add_argument("--no-tune", action="store_true", help="keep the default transition weights")
    pr.add_argument("--holdout-valid", action="store_true", help="count on train cut before the valid rows")
    pr.add_argument("--with-stages", action="store_true",
                    help="give the recipe's stage bundles the same prior (written to OUT.stages/)")
    pr.add_argument("--overwrite", action="store_true")
    pr.set_defaults(func=cmd_prior)

    ev = sub.add_parser("eval", help="HR/NDCG of a bundle's model on test.jsonl, baselines in the same run")
    ev.add_argument("--bundle", default=None, help="the bundle to evaluate (not needed with --baselines-only)")
    ev.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ev.add_argument("--baselines-only", action="store_true",
                    help="only the baselines (popularity, transitions, SASRec), e.g. on new data before training")
    ev.add_argument("--mode", choices=["direct", "reasoning", "both"], default="direct")
    ev.add_argument("--with-stages", action="store_true",
                    help="also evaluate the per-stage snapshots written by gream train (SFT, +curriculum, +SRPO)")
    ev.add_argument("--split", choices=["test", "valid"], default="test",
                    help="rows to evaluate on; valid is for tuning (use a bundle trained with holdout_valid)")
    ev.add_argument("--prior-strengths", default=None, help="comma-separated strengths to try (tuning on valid)")
    ev.add_argument("--prior-floors", default=None, help="comma-separated floors to try (tuning on valid)")
    ev.add_argument("--prior-mixtures", default=None,
                    help="comma-separated prior weights of mixture fusion to try (tuning on valid)")
    ev.add_argument("--beams", type=int, default=20)
    ev.add_argument("--no-sasrec", action="store_true", help="skip the SASRec baseline (minutes on 2 cores)")
    ev.add_argument("--prior", choices=["both", "off", "only"], default="both",
                    help="bundles with a collaborative prior: evaluate the model without it, fused with it "
                         "(rows labelled '+prior', as the service decodes), or both")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N test rows only")
    ev.add_argument("--reasoning-limit", type=int, default=None, help="reasoning mode on the first N rows only")
    ev.add_argument("--reasoning-tokens", type=int, default=256,
                    help="max reasoning tokens per row (the service's default stream budget)")
    ev.add_argument("--report", default=None, help="write the metrics as JSON here")
    ev.add_argument("--plot", default=None, help="write a PNG of HR@10/NDCG@10 by stage and baselines here")
    ev.set_defaults(func=cmd_eval)
