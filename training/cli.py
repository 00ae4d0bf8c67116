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
    from model_store.bundle import load_bundle
    from service.config import Settings
    from training.data import InteractionData
    from training.eval_report import EvalOptions, evaluate_bundle, print_report

    if args.bundle is None and not args.baselines_only:
        _log("gream eval: --bundle is required (or --baselines-only)")
        return 2
    bundle = None if args.baselines_only else load_bundle(args.bundle)
    data = InteractionData.load(args.data)
    split = data.valid if args.split == "valid" else data.test
    rows = split[: args.limit] if args.limit else split
    served_beams = args.served_beams or Settings.model_fields["default_beams"].default
    opts = EvalOptions(
        modes=["direct", "reasoning"] if args.mode == "both" else [args.mode], with_stages=args.with_stages,
        prior=args.prior, beams=args.beams, served_beams=served_beams, sasrec=not args.no_sasrec,
        reasoning_limit=args.reasoning_limit, reasoning_tokens=args.reasoning_tokens,
        prior_variants=lambda label, prior: prior_variants(label, prior, args.prior_strengths, args.prior_floors,
                                                           args.prior_mixtures))
    report = evaluate_bundle(bundle, data, rows, args.split, opts, log=_log)
    report["bundle"] = bundle.version if bundle else None
    report["training_timings"] = (bundle.manifest.get("stats", {}).get("training", {}).get("timings")
                                  if bundle else None)
    print_report(report, log=print)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
        _log(f"report -> {args.report}")
    if args.plot:
        from training.plot import plot_report

        plot_report(report, args.plot)
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
    ev.add_argument("--beams", type=int, default=20, help="beam width of the per-stage rows")
    ev.add_argument("--served-beams", type=int, default=None,
                    help="beam width of the served row (default: the service's GREAM_DEFAULT_BEAMS default)")
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
