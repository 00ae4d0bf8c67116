"""`gream`: the one command line for offline and online work.

    gream demo --out DIR                        synthetic catalog + users, train a small model, write a bundle
    gream bundle build --items F --out DIR      catalog -> semantic IDs -> trie -> bundle
    gream bundle inspect DIR [--json]           what a bundle holds
    gream bundle verify DIR                     check every file against the manifest's hashes
    gream bundle add-items DIR --items F --out NEW
    gream registry publish|list|activate|remove
    gream serve --bundle DIR [--engine transformers|vllm] [--engine-url URL ...]

Heavy imports live inside the command functions so `gream --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ bundle


def cmd_bundle_build(args: argparse.Namespace) -> int:
    from model_store.builder import BuildConfig, build_bundle
    from model_store.semantic_ids import QuantizerConfig

    cfg = BuildConfig(
        quantizer=QuantizerConfig(levels=args.levels, codebook_size=args.codebook_size,
                                  dedup_size=args.dedup_size or args.codebook_size, seed=args.seed,
                                  balanced=args.balanced),
        text_fields=tuple(args.fields.split(",")), embedder=args.embedder, tokenizer=args.tokenizer,
    )
    path, stats = build_bundle(args.items, args.out, cfg, interactions=args.interactions,
                               overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"bundle": str(path), **stats}, indent=2))
    return 0


def cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from model_store.bundle import inspect_bundle, load_bundle

    info = inspect_bundle(load_bundle(args.bundle, verify=not args.no_verify))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>24}: {value}")
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from model_store.bundle import verify_bundle

    problems = verify_bundle(args.bundle)
    if problems:
        print(f"{args.bundle}: FAILED", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"{args.bundle}: OK")
    return 0


def cmd_bundle_add_items(args: argparse.Namespace) -> int:
    from model_store.builder import add_items

    path, stats = add_items(args.bundle, args.items, args.out, overwrite=args.overwrite,
                            log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"bundle": str(path), **stats}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ registry


def cmd_registry(args: argparse.Namespace) -> int:
    from model_store.registry import Registry

    if args.action != "list" and not args.target:
        return _err(f"registry {args.action} needs a target ({'a bundle folder' if args.action == 'publish' else 'a version'})")
    reg = Registry(args.root)
    if args.action == "publish":
        version = reg.publish(args.target, activate=args.activate)
        print(version)
    elif args.action == "list":
        print(json.dumps(reg.versions(), indent=2))
    elif args.action == "activate":
        reg.activate(args.target)
        print(f"current -> {args.target}")
    elif args.action == "remove":
        reg.remove(args.target)
    return 0


# ------------------------------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from training.demo import build_demo
        from training.demo_data import DemoConfig
    except ImportError as exc:
        return _err(f"gream demo trains a model and needs the trainer (a dev install, not the serving image): {exc}")

    out = Path(args.out)
    if out.exists():
        if args.if_missing:
            print(f"demo bundle already at {out}", file=sys.stderr)
            return 0
        if not args.overwrite:
            return _err(f"{out} exists; pass --overwrite to rebuild it")
    cfg = DemoConfig(items=args.items, users=args.users, seed=args.seed)
    path, report = build_demo(out, data_dir=args.data_dir, cfg=cfg, max_minutes=args.minutes,
                              log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"bundle": str(path), "valid": report["valid"]}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import serve

    overrides: dict[str, Any] = {k: v for k, v in {
        "bundle": args.bundle, "host": args.host, "port": args.port, "engine": args.engine,
        "engine_urls": args.engine_url or None, "registry": args.registry, "redis_url": args.redis_url,
        "api_keys": args.api_key or None, "demo_page": args.demo_page or None,
        "expose_engine_api": args.expose_engine_api or None, "engine_subprocess": args.engine_subprocess,
    }.items() if v is not None}
    serve(overrides)
    return 0


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gream", description="GREAM Serve: generative recommendation, "
                                     "from catalog to served semantic IDs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the demo bundle (synthetic data, small model trained here)")
    demo.add_argument("--out", default="var/demo-bundle")
    demo.add_argument("--data-dir", default=None, help="where the synthetic data goes (default: OUT-data)")
    demo.add_argument("--items", type=int, default=1000)
    demo.add_argument("--users", type=int, default=3000)
    demo.add_argument("--minutes", type=float, default=2.5, help="time budget of the whole build")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--if-missing", action="store_true", help="do nothing when OUT already exists")
    demo.set_defaults(func=cmd_demo)

    bundle = sub.add_parser("bundle", help="build, inspect, verify bundles").add_subparsers(
        dest="bundle_command", required=True)
    build = bundle.add_parser("build", help="catalog JSON Lines -> bundle (IDs, trie, tokenizer)")
    build.add_argument("--items", required=True, help="catalog JSON Lines (item_id, title, ...)")
    build.add_argument("--out", required=True)
    build.add_argument("--interactions", default=None,
                       help="JSON Lines of sequences (item_ids) for popularity, e.g. train.jsonl")
    build.add_argument("--levels", type=int, default=3)
    build.add_argument("--codebook-size", type=int, default=256)
    build.add_argument("--dedup-size", type=int, default=None, help="default: the codebook size")
    build.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                       help="capacity-balanced clusters (fewer collisions; --no-balanced for plain k-means)")
    build.add_argument("--fields", default="title,brand,categories,description")
    build.add_argument("--embedder", default="all-MiniLM-L6-v2", help="name or local sentence-transformers folder")
    build.add_argument("--tokenizer", default=None, help="local HF tokenizer folder to extend (default: "
                       "train a BPE tokenizer on the catalog)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true")
    build.set_defaults(func=cmd_bundle_build)

    inspect = bundle.add_parser("inspect", help="print a bundle's summary")
    inspect.add_argument("bundle")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--no-verify", action="store_true", help="skip hash verification")
    inspect.set_defaults(func=cmd_bundle_inspect)

    verify = bundle.add_parser("verify", help="check files against the manifest (exit 1 on mismatch)")
    verify.add_argument("bundle")
    verify.set_defaults(func=cmd_bundle_verify)

    add = bundle.add_parser("add-items", help="new bundle version with items added, codebooks unchanged")
    add.add_argument("bundle")
    add.add_argument("--items", required=True)
    add.add_argument("--out", required=True)
    add.add_argument("--overwrite", action="store_true")
    add.set_defaults(func=cmd_bundle_add_items)

    reg = sub.add_parser("registry", help="versioned bundle registry with an atomic current pointer")
    reg.add_argument("action", choices=["publish", "list", "activate", "remove"])
    reg.add_argument("target", nargs="?", help="bundle folder (publish) or version (activate, remove)")
    reg.add_argument("--root", default="var/registry")
    reg.add_argument("--activate", action="store_true", help="with publish: make it current")
    reg.set_defaults(func=cmd_registry)

    serve = sub.add_parser("serve", help="run the HTTP gateway")
    serve.add_argument("--bundle", default=None, help="bundle folder or registry root (serves `current`)")
    serve.add_argument("--registry", default=None, help="registry root: serve its current version and follow it "
                       "(a newly activated version is swapped in live)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--engine", choices=["transformers", "vllm"], default=None)
    serve.add_argument("--engine-url", action="append", help="route to a remote engine worker (repeatable)")
    serve.add_argument("--redis-url", default=None)
    serve.add_argument("--api-key", action="append", help="require this bearer key (repeatable)")
    serve.add_argument("--demo-page", action="store_true", default=None, help="serve the browser demo at /demo")
    serve.add_argument("--expose-engine-api", action="store_true", default=None,
                       help="also serve /internal/engine/* so gateways can route to this process")
    serve.add_argument("--engine-subprocess", action=argparse.BooleanOptionalAction, default=None,
                       help="run the engine in a child process (default from GREAM_ENGINE_SUBPROCESS; unset: yes for "
                            "transformers, no for vllm)")
    serve.set_defaults(func=cmd_serve)

    try:
        from training.cli import add_training_commands
    except ImportError:  # a serving image ships no trainer; its `gream` serves and manages bundles
        return parser
    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model_store.bundle import BundleError
    from model_store.catalog import CatalogError

    try:
        return int(args.func(args) or 0)
    except (CatalogError, BundleError, FileNotFoundError, ValueError) as exc:
        return _err(str(exc))


if __name__ == "__main__":
    sys.exit(main())
