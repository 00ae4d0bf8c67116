"""Training-side subcommands of `gream` (kept here so the gateway never imports training code)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from model_store.bundle import load_bundle
    from model_store.tokens import id_token_ids
    from service.engine.hf_decoder import HFTrieDecoder
    from training.backbone import load_bundle_model
    from training.data import InteractionData
    from training.evaluate import evaluate_model, format_table

    bundle = load_bundle(args.bundle)
    data = InteractionData.load(args.data)
    rows = data.test[: args.limit] if args.limit else data.test
    tokenizer = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    decoder = HFTrieDecoder(load_bundle_model(bundle.model_path), tokenizer, bundle.trie,
                            id_token_ids(tokenizer, bundle.id_format))
    report = evaluate_model(decoder, bundle, data.train, rows, k=10, beams=args.beams, label="model (direct)")
    print(format_table(report["metrics"]))
    if args.report:
        Path(args.report).write_text(json.dumps({"bundle": bundle.version, **report}, indent=2))
        print(f"report -> {args.report}", file=sys.stderr)
    return 0


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="HR/NDCG of a bundle's model on test.jsonl, baselines in the same run")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ev.add_argument("--beams", type=int, default=20)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N test rows only")
    ev.add_argument("--report", default=None, help="write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval)
