"""Engine benchmark: one table from one run, on one bundle and one list of requests (k=10).

Rows, each at concurrency 1 and 32:
  (a) reference  `transformers generate(num_beams=10, num_return_sequences=10, max_new_tokens=depth,
                 prefix_allowed_tokens_fn=<dict trie>)`, the decoding in GREAM's and MiniOneRec's code
                 (concurrency 32 = batches of 32 prompts);
  (b) transformers decoders: HFTrieDecoder and the engine's default (SharedPrefixDecoder for
      Llama-family models), called directly; concurrency 32 = batches of 32;
  (c) vllm       VLLMEngine (AsyncLLM in-process; 32 requests in flight);
  (d) gateway    the HTTP gateway (`python -m service.cli serve`, uvicorn in a subprocess) in front of the
                 faster of (b)/(c) at concurrency 32, driven over real sockets by a load generator in a
                 process of its own, measured in time windows as wrk and locust measure: requests
                 completed per second of steady state; paired with its bare engine (the same engine,
                 settings and callers in this process, without HTTP).
For each row: requests/s, p50/p99 latency, the ratio of requests/s to (a) at the same concurrency, and
the fraction of requests whose top-10 items (same items, same order) equal (a)'s.

Requests: histories from the Amazon Industrial test split (--histories) when the bundle was built from
that catalog, otherwise random histories of the bundle's own items.

    .venv/bin/python loadtests/bench_engine.py --bundle var/demo-bundle --requests 64 --json var/bench.json

All rows use the same dtype (--dtype fp32|bf16). Engines run one after another (never two at once),
taking turns on `--rounds` slices of the requests, so that a noisy machine's slow minutes are shared by
all rows; the gateway takes turns the same way with the bare engine it runs (`--window` seconds each:
the same engine class and settings, built by the same factory, in this process and driven by the same
closed loop of callers without HTTP), and its overhead is read against that paired row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from loadtests.engine_bench.rows import BEAMS, DTYPES, K, Row, gateway_share_lines, rows_json, table
from loadtests.harness import QUIET_ENV, ROOT

SHARED_TEST = ROOT.parent / "shared" / "data" / "amazon-industrial" / "test.jsonl"


def make_histories(bundle: Any, n: int, seed: int, source: Path = SHARED_TEST) -> tuple[list[list[int]], str]:
    """Item-index histories, oldest first: the test split at `source` when the bundle holds its items."""
    if source.is_file():
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        hist = [[bundle.index_of.get(str(i)) for i in r["history"]] for r in rows]
        known = sum(h is not None for hs in hist for h in hs)
        total = sum(len(hs) for hs in hist)
        if total and known / total >= 0.95:
            usable = [[h for h in hs if h is not None][-10:] for hs in hist]
            usable = [h for h in usable if h]
            return usable[:n], f"{source.parent.name}/{source.name} (first {min(n, len(usable))} rows)"
    rng = np.random.default_rng(seed)
    out = [rng.choice(len(bundle.items), size=int(rng.integers(3, 11)), replace=False).tolist() for _ in range(n)]
    return out, f"random histories of the bundle's items (seed {seed})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="var/demo-bundle", help="bundle folder with a model")
    parser.add_argument("--requests", type=int, default=64, help="requests per row")
    parser.add_argument("--histories", type=Path, default=SHARED_TEST,
                        help="test.jsonl whose histories are the requests, when the bundle holds its items")
    parser.add_argument("--json", default=None, help="also write the rows as a JSON list to this file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated concurrency levels")
    parser.add_argument("--engines", default="reference,hf,vllm,gateway",
                        help="subset of reference,hf,vllm,gateway")
    parser.add_argument("--gateway-engine", choices=["auto", "transformers", "vllm"], default="auto",
                        help="engine behind the gateway row (auto: the faster at the highest concurrency)")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="GREAM_X=V",
                        help="a setting for the gateway process (repeatable), e.g. GREAM_TORCH_THREADS=1")
    parser.add_argument("--rounds", type=int, default=4,
                        help="engines take turns on this many slices of the requests (the machine is noisy)")
    parser.add_argument("--window", type=float, default=3.0,
                        help="seconds of each gateway round (after 0.5 s of warm-up), and of its paired bare round")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every engine (default: torch's choice, all cores); for the "
                             "gateway's transformers engine and its bare twin, threads per worker "
                             "(GREAM_TORCH_THREADS)")
    parser.add_argument("--vllm-option", action="append", default=[], metavar="FIELD=JSON",
                        help="a VLLMEngineConfig field for the vllm row (repeatable), e.g. enforce_eager=false")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def pick_gateway_engine(choice: str, rows: Sequence[Row], concurrencies: Sequence[int]) -> str:
    """`auto`: the faster of the transformers and vLLM rows at the highest concurrency."""
    if choice != "auto":
        return choice
    top = max(concurrencies)
    candidates = {("vllm" if r.engine.startswith("vllm") else "transformers"): r.rps for r in rows
                  if r.concurrency == top and r.engine.startswith(("vllm", "transformers"))}
    return max(candidates, key=candidates.__getitem__) if candidates else "transformers"


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = parse_args(argv)

    import torch

    from loadtests.engine_bench.direct import bench_direct, bench_vllm, direct_decoders
    from loadtests.engine_bench.gateway import bench_gateway
    from model_store.bundle import load_bundle
    from model_store.tokens import direct_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
        args.gateway_env.append(f"GREAM_TORCH_THREADS={args.threads}")

    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    bundle_dir = Path(args.bundle).resolve()
    bundle = load_bundle(bundle_dir)
    histories, source = make_histories(bundle, args.requests, args.seed, args.histories)
    prompts = [direct_prompt([bundle.spelled_id(i) for i in h]) for h in histories]
    print(f"bundle {bundle_dir} ({len(bundle.items)} items, {bundle.trie.depth}-token IDs), {len(prompts)} "
          f"requests from {source}, k={K}, beams={BEAMS}, dtype={args.dtype}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    rows: list[Row] = []
    refs: dict[int, Row] = {}
    pairs: list[tuple[Row, Row]] = []
    if engines & {"reference", "hf"}:
        decoders = direct_decoders(bundle, args.dtype, reference="reference" in engines, transformers="hf" in engines)
        rows, refs = bench_direct(decoders, prompts, concurrencies, args.rounds)
    if "vllm" in engines:
        try:
            options = {key: json.loads(value) for key, value in (kv.split("=", 1) for kv in args.vllm_option)}
            rows += asyncio.run(bench_vllm(bundle, prompts, args.dtype, concurrencies, options))
        except ImportError as exc:
            print(f"vllm row skipped: {exc}", file=sys.stderr)
    if "gateway" in engines:
        gateway_engine = pick_gateway_engine(args.gateway_engine, rows, concurrencies)
        extra_env = dict(kv.split("=", 1) for kv in args.gateway_env)
        pairs = asyncio.run(bench_gateway(bundle_dir, bundle, histories, gateway_engine, args.dtype, concurrencies,
                                          extra_env=extra_env, rounds=args.rounds, window_s=args.window))
        rows += [row for pair in pairs for row in pair]

    print()
    print(table(rows, refs))
    for line in gateway_share_lines(pairs):
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows_json(rows, refs), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
