"""Training-side subcommands of `gream` (kept here so the gateway never imports training code).

    gream train --data DIR --out BUNDLE [--config tiny|small|FILE] [--stages align,reason,srpo]
                [--max-minutes N] [--items ITEMS.jsonl] [--teacher-url URL]
    gream eval --bundle BUNDLE --data DIR [--mode direct|reasoning|both] [--with-stages]
               [--report OUT.json] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


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
    from training.backbone import load_bundle_model
    from training.baselines import baseline_rows
    from training.data import InteractionData
    from training.evaluate import format_table
    from training.recipe import STAGE_LABELS, evaluate_modes, stage_bundle_paths

    bundle = load_bundle(args.bundle)
    data = InteractionData.load(args.data)
    rows = data.test[: args.limit] if args.limit else data.test
    modes = ["direct", "reasoning"] if args.mode == "both" else [args.mode]
    targets: list[tuple[str, object]] = []
    if args.with_stages:
        targets += [(STAGE_LABELS.get(stage, stage), load_bundle(path))
                    for stage, path in stage_bundle_paths(bundle).items()]
        if not targets:
            _log("no stage bundles recorded in this bundle's manifest; evaluating the bundle alone")
    if not targets:
        targets = [("model", bundle)]
    metrics: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for label, b in targets:
        t = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(b.tokenizer_path))
        model = load_bundle_model(b.model_path)
        stage_modes = modes if (label != STAGE_LABELS["align"] or not args.with_stages) else ["direct"]
        metrics.update(evaluate_modes(model, tokenizer, b, rows, stage_modes, label, beams=args.beams,
                                      reasoning_rows=args.reasoning_limit, reasoning_tokens=args.reasoning_tokens))
        timings[label] = time.perf_counter() - t
    metrics.update(baseline_rows(data.train, rows, 10, valid=data.valid))
    print(format_table({n: {k: v for k, v in m.items() if "@" in k} for n, m in metrics.items()}))
    report = {"bundle": bundle.version, "rows": len(rows), "beams": args.beams, "modes": modes,
              "metrics": metrics, "eval_seconds": timings,
              "training_timings": bundle.manifest.get("stats", {}).get("training", {}).get("timings")}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
        _log(f"report -> {args.report}")
    if args.plot:
        from training.plot import plot_report

        plot_report(metrics, args.plot)
        _log(f"plot -> {args.plot}")
    return 0


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train with the GREAM recipe (align -> reason -> srpo) into a bundle")
    tr.add_argument("--data", required=True, help="folder with items.jsonl, train.jsonl, valid.jsonl")
    tr.add_argument("--out", required=True, help="bundle folder to write (replaced if present)")
    tr.add_argument("--config", default="small", help="preset tiny|small, or a JSON/TOML file (may set base=...)")
    tr.add_argument("--stages", default="align,reason,srpo", help="comma-separated subset of align,reason,srpo")
    tr.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock budget of the whole run")
    tr.add_argument("--items", default=None, help="catalog (default: DATA/items.jsonl)")
    tr.add_argument("--teacher-url", default=None,
                    help="OpenAI-compatible endpoint (e.g. http://host:8000/v1) to write the reasoning; "
                         "key from $GREAM_TEACHER_API_KEY; default: offline templates")
    tr.add_argument("--teacher-model", default="default", help="model name sent to the teacher endpoint")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="HR/NDCG of a bundle's model on test.jsonl, baselines in the same run")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ev.add_argument("--mode", choices=["direct", "reasoning", "both"], default="direct")
    ev.add_argument("--with-stages", action="store_true",
                    help="also evaluate the per-stage snapshots written by gream train (SFT, +curriculum, +SRPO)")
    ev.add_argument("--beams", type=int, default=20)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N test rows only")
    ev.add_argument("--reasoning-limit", type=int, default=None, help="reasoning mode on the first N rows only")
    ev.add_argument("--reasoning-tokens", type=int, default=128, help="max reasoning tokens per row")
    ev.add_argument("--report", default=None, help="write the metrics as JSON here")
    ev.add_argument("--plot", default=None, help="write a PNG of HR@10/NDCG@10 by stage and baselines here")
    ev.set_defaults(func=cmd_eval)
