"""Trie benchmark: the flat-array trie (model_store.trie) against a dict-of-dicts trie.

For synthetic catalogs of 10k, 100k and 1M items with 4-token semantic IDs (3 levels x 256 codes plus
a de-duplication code) it measures, for both implementations in the same run:

  * build time, and memory: bytes of the flat arrays, peak RSS growth during the build and the RSS
    still held afterwards;
  * `children()` for a batch of 320 beams at each depth (what one constrained beam-search step asks);
  * the allowed next codes for one beam given its prefix;
  * a per-request filter that excludes 50 items (with subtree pruning, so no beam dead-ends).

The baseline is the structure GREAM's and MiniOneRec's decoding code walks per token: nested Python
dicts keyed by code, leaves holding the item index. Its filter computes the same pruned set (blocked
prefixes, bottom-up) so both sides do the same job.

Each (size, implementation) runs in a forked child process so that memory figures of one do not leak
into the next. Lookup costs are means over calls with different random beams (best of several rounds).

    python loadtests/bench_trie.py                      # 10k, 100k, 1M (about 1-2 minutes on 2 cores)
    python loadtests/bench_trie.py --sizes 10k,100k --json var/bench_trie.json
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_store.tokens import IdFormat
from model_store.trie import ROOT, ItemTrie

FMT = IdFormat(levels=3, codebook_size=256, dedup_size=256)

# ------------------------------------------------------------------------------------------ data


def synthetic_codes(n: int, seed: int = 0) -> np.ndarray:
    """[n, 4] unique IDs: skewed level codes (real catalogs use some codes far more than others),
    then a de-duplication code numbering the items that share their first three codes."""
    rng = np.random.default_rng(seed)
    base = np.empty((n, FMT.levels), dtype=np.int64)
    for level in range(FMT.levels):
        p = rng.dirichlet(np.full(FMT.codebook_size, 1.0 if level == 0 else 0.5))
        base[:, level] = rng.choice(FMT.codebook_size, n, p=p)
    order = np.lexsort(base.T[::-1])
    sb = base[order]
    new = np.ones(n, dtype=bool)
    new[1:] = np.any(sb[1:] != sb[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    dedup = np.empty(n, dtype=np.int64)
    dedup[order] = np.arange(n) - group_start
    if dedup.max() >= FMT.dedup_size:
        raise RuntimeError("synthetic catalog overflowed the de-duplication level; change the seed")
    return np.concatenate([base, dedup[:, None]], axis=1)


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def fmt_size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


# ------------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    try:  # Linux >= 4.0: resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # a freshly forked child's VmHWM is its RSS at fork, close enough


# ------------------------------------------------------------------------------------------ baseline


class DictTrie:
    """Nested dicts keyed by per-level code; the last level maps to the item index."""

    def __init__(self, codes: np.ndarray):
        root: dict = {}
        for start in range(0, len(codes), 65536):  # chunks: no full-catalog list of lists at once
            for i, row in enumerate(codes[start:start + 65536].tolist(), start):
                node = root
                for c in row[:-1]:
                    nxt = node.get(c)
                    if nxt is None:
                        nxt = node[c] = {}
                    node = nxt
                node[row[-1]] = i
        self.root = root
        self.depth = codes.shape[1]

    def walk(self, prefix: Sequence[int]) -> Any:
        node = self.root
        for c in prefix:
            node = node.get(c)
            if node is None:
                return None
        return node

    def allowed_next(self, prefix: Sequence[int]) -> list[int]:
        node = self.walk(prefix)
        return [] if node is None or not isinstance(node, dict) else list(node)

    def children(self, beams: Sequence[dict]) -> tuple[list[int], list[int], list[Any]]:
        rows: list[int] = []
        codes: list[int] = []
        kids: list[Any] = []
        for r, node in enumerate(beams):
            rows.extend([r] * len(node))
            codes.extend(node.keys())
            kids.extend(node.values())
        return rows, codes, kids

    def children_filtered(self, beams: Sequence[tuple[tuple[int, ...], dict]], blocked: set
                          ) -> tuple[list[int], list[int], list[Any]]:
        """Like `children`, skipping blocked prefixes; a beam is (its prefix, its node)."""
        rows: list[int] = []
        codes: list[int] = []
        kids: list[Any] = []
        for r, (prefix, node) in enumerate(beams):
            for c, kid in node.items():
                if prefix + (c,) not in blocked:
                    rows.append(r)
                    codes.append(c)
                    kids.append(kid)
        return rows, codes, kids

    def make_filter(self, exclude_paths: Sequence[tuple[int, ...]]) -> set[tuple[int, ...]]:
        """Blocked prefixes: excluded leaves, then every node all of whose children are blocked."""
        blocked = set(exclude_paths)
        frontier = {p[:-1] for p in exclude_paths}
        while frontier:
            parents = set()
            for pre in frontier:
                node = self.walk(pre)
                if all(pre + (c,) in blocked for c in node):
                    blocked.add(pre)
                    if pre:
                        parents.add(pre[:-1])
            frontier = parents
        return blocked


# ------------------------------------------------------------------------------------------ timing


def mean_us(calls: Sequence[Callable[[], Any]], min_time: float, min_rounds: int = 3) -> float:
    """Microseconds per call: each round calls every function of `calls` (different inputs) once;
    rounds repeat for at least `min_time` seconds and `min_rounds` rounds, and the best round's mean
    is reported (the usual timeit practice: other processes on a shared machine only add time)."""
    for fn in calls[:3]:  # warm-up
        fn()
    best, rounds, start = float("inf"), 0, time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        for fn in calls:
            fn()
        best = min(best, (time.perf_counter() - t) / len(calls))
        rounds += 1
    return best * 1e6


def run_job(impl: str, codes: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Build one implementation and measure it; runs in a fresh child process."""
    rng = np.random.default_rng(args.seed + 1)
    n = len(codes)
    gc.collect()
    rss0 = _status_kb("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    trie = ItemTrie.build(codes, FMT) if impl == "flat" else DictTrie(codes)
    build_s = time.perf_counter() - t
    peak_kb = _status_kb("VmHWM") - rss0
    gc.collect()
    kept_kb = _status_kb("VmRSS") - rss0
    out: dict[str, Any] = {"impl": impl, "items": n, "build_s": build_s, "peak_rss_delta_mb": peak_kb / 1024,
                           "rss_kept_mb": kept_kb / 1024,
                           "array_mb": trie.nbytes / 2**20 if impl == "flat" else None}

    sets = args.query_sets
    samples = [rng.integers(0, n, args.beams) for _ in range(sets)]
    code_rows = codes.tolist() if n <= 200_000 else None

    def row_of(i: int) -> list[int]:
        return code_rows[i] if code_rows is not None else codes[i].tolist()

    # per-request filters excluding `exclusions` items
    excl = [rng.choice(n, args.exclusions, replace=False) for _ in range(sets)]
    if impl == "flat":
        filters = [trie.make_filter(exclude=e) for e in excl]
        filter_calls = [lambda e=e: trie.make_filter(exclude=e) for e in excl]
    else:
        paths = [[tuple(row_of(int(i))) for i in e] for e in excl]
        filters = [trie.make_filter(p) for p in paths]
        filter_calls = [lambda p=p: trie.make_filter(p) for p in paths]
    out["make_filter_us"] = mean_us(filter_calls, args.min_time)

    # children() for a batch of beams at each depth, without and with a request's filter
    for depth in range(FMT.depth):
        if impl == "flat":
            batches = [np.full(args.beams, ROOT, dtype=np.int64) if depth == 0
                       else trie.item_path[s, depth - 1].astype(np.int64) for s in samples]
            calls = [lambda b=b: trie.children(b) for b in batches]
            filtered = [lambda b=b, f=f: trie.children(b, f) for b, f in zip(batches, filters)]
            pairs = np.mean([len(trie.children(b).node) for b in batches])
        else:
            prefixes = [[tuple(row_of(int(i))[:depth]) for i in s] for s in samples]
            batches = [[trie.walk(p) for p in ps] for ps in prefixes]
            calls = [lambda b=b: trie.children(b) for b in batches]
            beams = [list(zip(ps, b)) for ps, b in zip(prefixes, batches)]
            filtered = [lambda b=b, f=f: trie.children_filtered(b, f) for b, f in zip(beams, filters)]
            pairs = np.mean([len(trie.children(b)[0]) for b in batches])
        out[f"children_d{depth}_us"] = mean_us(calls, args.min_time)
        out[f"children_filtered_d{depth}_us"] = mean_us(filtered, args.min_time)
        out[f"children_d{depth}_pairs"] = float(pairs)

    # allowed next codes for one beam, from its prefix (depths 0..3 mixed)
    prefixes = [tuple(row_of(int(i))[: int(d)]) for i, d in
                zip(rng.integers(0, n, 2000), rng.integers(0, FMT.depth, 2000))]
    calls = [lambda p=p: trie.allowed_next(p) for p in prefixes]
    out["allowed_next_us"] = mean_us(calls, args.min_time)
    return out


def _child(conn: Any, impl: str, codes: np.ndarray, args: argparse.Namespace) -> None:
    try:
        conn.send(run_job(impl, codes, args))
    except Exception as exc:  # noqa: BLE001 - report to the parent instead of hanging it
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


def run_isolated(impl: str, codes: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, impl, codes, args))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{impl} trie, {len(codes)} items: {result['error']}")
    return result


# ------------------------------------------------------------------------------------------ report


ROWS: list[tuple[str, str, str]] = [
    ("build_s", "build time (s)", "{:.3f}"),
    ("array_mb", "flat arrays (MB)", "{:.1f}"),
    ("peak_rss_delta_mb", "peak RSS delta during build (MB)", "{:.1f}"),
    ("rss_kept_mb", "RSS held after build (MB)", "{:.1f}"),
    *[row for d in range(4) for row in (
        (f"children_d{d}_us", f"children(), 320 beams at depth {d} (us)", "{:.1f}"),
        (f"children_filtered_d{d}_us", f"  depth {d}, with a 50-exclusion filter (us)", "{:.1f}"))],
    ("allowed_next_us", "allowed next, 1 beam from prefix (us)", "{:.2f}"),
    ("make_filter_us", "make_filter, 50 exclusions (us)", "{:.1f}"),
]


def render(results: dict[int, dict[str, dict[str, Any]]]) -> str:
    sizes = sorted(results)
    head = f"{'metric':<42}{'items':>7}{'flat':>12}{'dict':>12}{'dict/flat':>11}"
    lines = [head, "-" * len(head)]
    for key, label, spec in ROWS:
        for n in sizes:
            f, d = results[n]["flat"].get(key), results[n]["dict"].get(key)
            f_cell = "-" if f is None else spec.format(f)
            d_cell = "-" if d is None else spec.format(d)
            ratio = f"{d / f:.1f}x" if f and d is not None else "-"
            lines.append(f"{label if n == sizes[0] else '':<42}{fmt_size(n):>7}{f_cell:>12}{d_cell:>12}"
                         f"{ratio:>11}")
    lines.append("")
    lines.append("children per call (beam, child) pairs: " + "; ".join(
        f"{fmt_size(n)}: " + "/".join(f"{results[n]['flat'][f'children_d{d}_pairs']:.0f}" for d in range(4))
        for n in sizes) + "  (depths 0/1/2/3)")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        lines.append(f"flat-trie growth {fmt_size(lo)} -> {fmt_size(hi)} items ({hi // lo}x):")
        for key, label, _ in ROWS[4:]:
            f_lo, f_hi = results[lo]["flat"][key], results[hi]["flat"][key]
            per_pair = ""
            if key.startswith("children"):
                pairs_key = key.replace("children_filtered_", "children_").replace("_us", "_pairs")
                p_lo, p_hi = results[lo]["flat"][pairs_key], results[hi]["flat"][pairs_key]
                per_pair = (f"; per returned child {f_lo / p_lo * 1e3:.1f} -> {f_hi / p_hi * 1e3:.1f} ns"
                            if p_lo and p_hi else "")
            lines.append(f"  {label:<42} x{f_hi / f_lo:.2f}{per_pair}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10k,100k,1M", help="comma-separated item counts (10k, 1M, 250000)")
    ap.add_argument("--beams", type=int, default=320, help="beams per children() batch")
    ap.add_argument("--exclusions", type=int, default=50, help="items excluded per request filter")
    ap.add_argument("--query-sets", type=int, default=20, help="different random inputs per measurement")
    ap.add_argument("--min-time", type=float, default=0.3,
                    help="seconds spent timing each measurement (at least 3 rounds; the best round counts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    sizes = sorted(parse_size(s) for s in args.sizes.split(",") if s.strip())

    # glibc serves big blocks with mmap until a freed one raises its dynamic threshold; without this
    # warm-up the first job pays page faults on every large temporary array, the later ones do not.
    warm = np.ones(2_000_000)
    del warm
    results: dict[int, dict[str, dict[str, Any]]] = {}
    t0 = time.perf_counter()
    with tqdm(total=2 * len(sizes), desc="trie bench", unit="job", file=sys.stderr) as bar:
        for n in sizes:
            bar.set_postfix_str(f"{fmt_size(n)} items: synthetic IDs")
            codes = synthetic_codes(n, args.seed)
            results[n] = {}
            for impl in ("flat", "dict"):
                bar.set_postfix_str(f"{fmt_size(n)} items: {impl}")
                results[n][impl] = run_isolated(impl, codes, args)
                bar.update()
            del codes
    env = (f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
           f"load average {os.getloadavg()[0]:.1f}, total {time.perf_counter() - t0:.0f} s")
    print(f"Trie benchmark: {FMT.levels} levels x {FMT.codebook_size} codes + dedup level "
          f"({FMT.depth}-token IDs), {args.beams} beams per batch, {args.exclusions} exclusions per filter")
    print(env)
    print()
    print(render(results))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k != "json_out"}, "environment": env,
            "results": [results[n][impl] for n in sizes for impl in ("flat", "dict")]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
