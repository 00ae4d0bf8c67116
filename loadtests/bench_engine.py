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
                 process of its own (LoadGenerator), measured in time windows (run_window) as wrk and
                 locust measure: requests completed per second of steady state; paired with its bare
                 engine (the same engine, settings and callers in this process, without HTTP).
For each row: requests/s, p50/p99 latency, the ratio of requests/s to (a) at the same concurrency, and
the fraction of requests whose top-10 items (same items, same order) equal (a)'s.

Requests: histories from ../shared/data/amazon-industrial/test.jsonl when the bundle was built from
that catalog, otherwise random histories of the bundle's own items.

    .venv/bin/python loadtests/bench_engine.py --bundle var/demo-bundle --requests 64 --json var/bench.json

All rows use the same dtype (--dtype fp32|bf16). Engines run one after another (never two at once),
taking turns on `--rounds` slices of the requests, so that this noisy machine's slow minutes are
shared by all rows; the gateway takes turns the same way with the bare engine it runs (`--window`
seconds each: the same engine class and settings, built by the same factory, in this process and
driven by the same closed loop of callers without HTTP), and its overhead is read against that
paired row.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_TEST = ROOT.parent / "shared" / "data" / "amazon-industrial" / "test.jsonl"
K = 10
BEAMS = 10
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class Row:
    engine: str
    concurrency: int
    latencies_s: list[float]
    wall_s: float
    results: list[list[int]] = field(default_factory=list)
    note: str = ""

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else float("nan")

    def pct(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_s) * 1000.0, q)) if self.latencies_s else float("nan")

    def add(self, part: Row) -> None:
        """Append another round of the same engine and concurrency."""
        self.latencies_s += part.latencies_s
        self.results += part.results
        self.wall_s += part.wall_s


# ------------------------------------------------------------------------------------------ requests


def make_histories(bundle: Any, n: int, seed: int) -> tuple[list[list[int]], str]:
    """Item-index histories, oldest first: the shared test split when the bundle holds its items."""
    if SHARED_TEST.is_file():
        rows = [json.loads(line) for line in SHARED_TEST.read_text().splitlines() if line.strip()]
        hist = [[bundle.index_of.get(str(i)) for i in r["history"]] for r in rows]
        known = sum(h is not None for hs in hist for h in hs)
        total = sum(len(hs) for hs in hist)
        if total and known / total >= 0.95:
            usable = [[h for h in hs if h is not None][-10:] for hs in hist]
            usable = [h for h in usable if h]
            return usable[:n], f"{SHARED_TEST.parent.name}/test.jsonl (first {min(n, len(usable))} rows)"
    rng = np.random.default_rng(seed)
    out = [rng.choice(len(bundle.items), size=int(rng.integers(3, 11)), replace=False).tolist() for _ in range(n)]
    return out, f"random histories of the bundle's items (seed {seed})"


# ------------------------------------------------------------------------------------------ timing


def run_batches(name: str, fn: Callable[[Sequence[str]], list[list[int]]], prompts: Sequence[str],
                batch: int) -> Row:
    """Synchronous engines: `batch` prompts per call; each request's latency is its batch's time."""
    from tqdm import tqdm

    lat: list[float] = []
    results: list[list[int]] = []
    started = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"{name} c={batch}", unit="req", leave=False) as bar:
        for lo in range(0, len(prompts), batch):
            chunk = prompts[lo:lo + batch]
            t = time.perf_counter()
            results.extend(fn(chunk))
            lat.extend([time.perf_counter() - t] * len(chunk))
            bar.update(len(chunk))
    return Row(name, batch, lat, time.perf_counter() - started, results)


async def run_async(name: str, fn: Callable[[int], Awaitable[list[int]]], indices: Sequence[int] | int,
                    concurrency: int) -> Row:
    """Asynchronous engines: `concurrency` requests in flight at all times (requests `indices`, or
    0..n-1 for an int)."""
    from tqdm import tqdm

    order = list(range(indices)) if isinstance(indices, int) else list(indices)
    n = len(order)
    lat = [0.0] * n
    results: list[list[int]] = [[] for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=n, desc=f"{name} c={concurrency}", unit="req", leave=False)

    async def one(slot: int) -> None:
        async with sem:
            t = time.perf_counter()
            results[slot] = await fn(order[slot])
            lat[slot] = time.perf_counter() - t
            bar.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(one(slot) for slot in range(n)))
    wall = time.perf_counter() - started
    bar.close()
    return Row(name, concurrency, lat, wall, results)


async def run_window(name: str, fn: Callable[[int], Awaitable[list[Any]]], indices: Sequence[int],
                     concurrency: int, window_s: float, warm_up_s: float = 0.5, progress: bool = True) -> Row:
    """A closed loop of `concurrency` callers cycling over the requests `indices` for `warm_up_s` +
    `window_s`; the row holds the requests that complete inside the window (after the warm-up), as
    wrk and locust measure. A batching server thus sees `concurrency` callers for the whole window: a
    fixed set of requests instead ramps up and down, and its partial batches are charged to the
    server (the bare engine's rows get whole batches by construction). Every request's result is kept
    (its first answer): callers go on past the window, for the missing ones only, until each has one."""
    from tqdm import tqdm

    order = list(indices)
    results: dict[int, list[Any]] = {}
    in_flight: set[int] = set()
    lat: list[float] = []
    cycle = itertools.count()
    started = time.perf_counter()
    opens, closes = started + warm_up_s, started + warm_up_s + window_s
    bar = tqdm(total=round(warm_up_s + window_s, 1), desc=f"{name} c={concurrency}", unit="s", leave=False,
               disable=not progress, bar_format="{desc}: {n:.1f}/{total} s")

    def pick() -> int | None:
        if time.perf_counter() < closes:
            return next(cycle) % len(order)
        missing = [s for s in range(len(order)) if s not in results and s not in in_flight]
        return missing[0] if missing else None

    async def worker() -> None:
        while (slot := pick()) is not None:
            in_flight.add(slot)
            t = time.perf_counter()
            out = await fn(order[slot])
            end = time.perf_counter()
            in_flight.discard(slot)
            results.setdefault(slot, out)
            if opens <= end <= closes:
                lat.append(end - t)
            bar.n = round(min(end - started, warm_up_s + window_s), 1)
            bar.refresh()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    return Row(name, concurrency, lat, window_s, [results[s] for s in range(len(order))])


def rounds_of(n: int, rounds: int) -> list[range]:
    """`rounds` consecutive slices of 0..n-1 (engines take turns on them, so a slow minute of this
    noisy machine is shared by every engine instead of landing on one row)."""
    bounds = np.linspace(0, n, max(1, rounds) + 1).astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def run_interleaved(fns: dict[str, Callable[[Sequence[str]], list[list[int]]]], prompts: Sequence[str],
                    batch: int, rounds: int) -> dict[str, Row]:
    """Every engine on every round's prompts, the engines' order rotated from round to round."""
    rows = {name: Row(name, batch, [], 0.0) for name in fns}
    names = list(fns)
    for r, part in enumerate(rounds_of(len(prompts), rounds)):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rows[name].add(run_batches(name, fns[name], [prompts[i] for i in part], batch))
    return rows


# ------------------------------------------------------------------------------------------ engines


def load_hf(bundle: Any, dtype: str) -> tuple[Any, Any, list[int]]:
    import torch
    from transformers import AutoTokenizer

    from model_store.tokens import id_token_ids
    from model_store.model import load_bundle_model

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    model = load_bundle_model(bundle.model_path, dtype=getattr(torch, DTYPES[dtype]))
    return model, tok, id_token_ids(tok, bundle.id_format)


class ReferenceDecoder:
    """GREAM's / MiniOneRec's decoding: beam search in `generate` with a Python dict trie."""

    def __init__(self, model: Any, tokenizer: Any, bundle: Any, code_tokens: Sequence[int]):
        self.model, self.tok, self.depth = model, tokenizer, bundle.trie.depth
        self.tok.padding_side = "left"
        fmt = bundle.id_format
        seqs = [tuple(int(code_tokens[fmt.level_offset(lv) + int(c)]) for lv, c in enumerate(row))
                for row in bundle.codes]
        self.item_of = {s: i for i, s in enumerate(seqs)}
        self.allowed: dict[tuple[int, ...], list[int]] = {}
        for s in seqs:
            for d in range(self.depth):
                self.allowed.setdefault(s[:d], [])
                if s[d] not in self.allowed[s[:d]]:
                    self.allowed[s[:d]].append(s[d])
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        import torch

        enc = self.tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc["input_ids"].shape[1]

        def allowed(_batch_id: int, ids: torch.Tensor) -> list[int]:
            return self.allowed.get(tuple(ids[width:].tolist()), [self.eos])

        with torch.inference_mode():
            out = self.model.generate(**enc, num_beams=BEAMS, num_return_sequences=BEAMS, max_new_tokens=self.depth,
                                      min_new_tokens=self.depth, prefix_allowed_tokens_fn=allowed, do_sample=False,
                                      early_stopping=True, length_penalty=1.0, output_scores=False,
                                      return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
        gen = out.sequences[:, width:].tolist()
        results = []
        for p in range(len(prompts)):
            items = [self.item_of.get(tuple(g)) for g in gen[p * BEAMS:(p + 1) * BEAMS]]
            results.append([i for i in items if i is not None][:K])
        return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bench_vllm(bundle: Any, prompts: Sequence[str], dtype: str, concurrencies: Sequence[int]) -> list[Row]:
    from service.engine.base import EngineRequest
    from service.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(bundle, default_beams=BEAMS, dtype=DTYPES[dtype], queue_max=4096)
    await engine.start()
    rows = []
    try:
        async def one(i: int) -> list[int]:
            items = await engine.recommend(EngineRequest(f"bench-{i}", prompts[i], K))
            return [it.index for it in items]

        for _ in range(2):  # warm-up
            await asyncio.gather(*(one(i) for i in range(min(8, len(prompts)))))
        for c in concurrencies:
            rows.append(await run_async("vllm: VLLMEngine", one, len(prompts), c))
    finally:
        await engine.close()
    return rows


def engine_settings(bundle_dir: Path, env: dict[str, str]) -> Any:
    """The Settings a gateway started with the environment `env` runs its engine with."""
    from service.config import Settings

    fields = {key[len("GREAM_"):].lower(): value for key, value in env.items() if key.startswith("GREAM_")}
    known = {name: value for name, value in fields.items() if name in Settings.model_fields}
    return Settings(_env_file=None, **{**known, "bundle": bundle_dir})


def engine_label(engine: Any) -> str:
    """What runs behind the gateway, as a row name: the engine class and, for the in-process
    transformers engine, its workers and threads."""
    label = f"{engine.name} engine ({type(engine).__name__}"
    if hasattr(engine, "workers"):
        label += f", {engine.workers} worker(s) x {engine.torch_threads} torch thread(s)"
    return label + ")"


async def bench_gateway(bundle_dir: Path, bundle: Any, histories: Sequence[Sequence[int]], engine: str,
                        dtype: str, concurrencies: Sequence[int], ready_timeout_s: float = 600,
                        extra_env: dict[str, str] | None = None, rounds: int = 1, window_s: float = 3.0,
                        ) -> list[tuple[Row, Row]]:
    """(bare engine, gateway) rows per concurrency. The bare engine is the gateway's own model runtime
    (built from the same settings by the same factory, always in-process: a gateway that runs it in a
    child process is charged for that too) in this process, driven by the same closed loop of callers
    without HTTP; the two take turns, round by round, so the overhead is the ratio of the two."""
    import httpx

    from service.engine.factory import create_local_engine
    from service.history import InMemoryHistoryStore
    from service.recommender import Query, Recommender

    port = free_port()
    env = {**os.environ, "GREAM_DTYPE": DTYPES[dtype], "GREAM_LOG_LEVEL": "warning", "GREAM_QUEUE_MAX": "4096",
           "GREAM_DEFAULT_BEAMS": str(BEAMS), "GREAM_MAX_BATCH": "32", "GREAM_ENGINE": engine, **(extra_env or {})}
    env.pop("GREAM_REDIS_URL", None)  # the embedded in-memory history store: requests carry histories
    settings = engine_settings(bundle_dir, env)
    bare_engine = create_local_engine(settings, bundle)
    bodies = [{"history": [bundle.items[i].item_id for i in h], "k": K, "exclude_seen": False} for h in histories]
    # What the gateway's recommender asks its engine for each body (prompt, history window, prior),
    # planned once, before any timing.
    recommender = Recommender(bundle, bare_engine, InMemoryHistoryStore(), history_cap=settings.history_cap,
                              drop_chunk=settings.history_drop_chunk, use_prior=settings.use_prior)
    requests = [recommender.engine_request(await recommender.plan(Query(**body), f"bare-{n}"))
                for n, body in enumerate(bodies)]

    async def bare_one(i: int) -> list[int]:
        return [it.index for it in await bare_engine.recommend(requests[i])]

    cmd = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle_dir), "--host", "127.0.0.1",
           "--port", str(port), "--engine", engine]
    log_file = tempfile.NamedTemporaryFile(prefix="bench-gateway-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log_file,  # noqa: ASYNC220 (before timing)
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    pairs: list[tuple[Row, Row]] = []
    try:
        await bare_engine.start()
        label = engine_label(bare_engine)
        await run_window("warm-up", bare_one, range(min(8, len(requests))), 8, 0.5, progress=False)
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    err = Path(log_file.name).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"gateway exited with {proc.returncode} (log {log_file.name}):\n{err}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway did not become ready in time")
                await asyncio.sleep(1.0)
            with LoadGenerator(port, [json.dumps(body) for body in bodies]) as loadgen:
                loadgen.run(range(min(8, len(bodies))), 8, 0.5)  # warm-up
                for c in concurrencies:
                    where = ", in a child process" if settings.engine_in_child_process else ""
                    row = Row(f"gateway: HTTP -> {label}{where}", c, [], 0.0)
                    bare = Row(f"{label}, in-process, taking turns with the gateway", c, [], 0.0)
                    before, cpu = await batch_totals(client), 0.0
                    for part in rounds_of(len(bodies), rounds):
                        bare.add(await run_window("bare engine", bare_one, part, c, window_s))
                        measured, cpu_s = loadgen.run(part, c, window_s)
                        measured.results = [[bundle.index_of[i] for i in items] for items in measured.results]
                        row.add(measured)
                        cpu += cpu_s
                    # This machine's cores are shared with the load generator: say how much it took.
                    row.note = f"client used {cpu / row.wall_s:.2f} cores"
                    after = await batch_totals(client)
                    if after[1] > before[1]:
                        served, batches, busy = (a - b for a, b in zip(after[:3], before[:3], strict=True))
                        # Busy seconds per request times requests/s, per worker: the share of the time
                        # the engine's workers were decoding (the rest they waited for the HTTP side).
                        row.note += (f", mean engine batch {served / batches:.1f}, engine busy "
                                     f"{busy / served * row.rps / max(1.0, after[3]):.0%} "
                                     f"({1000 * busy / served:.2f} worker-ms/request)")
                    pairs.append((bare, row))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        await bare_engine.close()
    return pairs


class LoadGenerator:
    """The gateway rows' client, in a process of its own (`bench_engine.py --loadgen PORT`), so that it
    shares neither an interpreter nor a GIL with the paired engine. One process for all rounds
    (connections stay open); it is told each round's requests, concurrency and window on stdin and
    answers with the round (latencies, item ids, its own CPU time) as one JSON line on stdout."""

    def __init__(self, port: int, bodies: Sequence[str]):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--loadgen", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        self._send({"bodies": list(bodies)})

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def run(self, indices: Sequence[int], concurrency: int, window_s: float, warm_up_s: float = 0.5
            ) -> tuple[Row, float]:
        """One round (run_window) over the requests `indices`; the row and the client's CPU seconds."""
        assert self.proc.stdout is not None
        self._send({"indices": list(indices), "concurrency": concurrency, "window_s": window_s,
                    "warm_up_s": warm_up_s})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {self.proc.wait()}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"load generator: {out['error']}")
        return Row("gateway", concurrency, out["latencies_s"], out["wall_s"], out["results"]), out["cpu_s"]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self._send({"quit": True})
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def loadgen_main(port: int) -> int:
    """The load generator process (see LoadGenerator): rounds on request, until told to quit."""
    bodies = [b.encode() for b in json.loads(sys.stdin.readline())["bodies"]]
    loop = asyncio.new_event_loop()
    client = KeepAliveClient("127.0.0.1", port)

    async def one(i: int) -> list[str]:
        return [it["item_id"] for it in json.loads(await client.post("/v1/recommendations", bodies[i]))["items"]]

    for line in sys.stdin:
        message = json.loads(line)
        if message.get("quit"):
            break
        try:
            t_cpu = time.process_time()
            row = loop.run_until_complete(run_window("gateway", one, message["indices"], message["concurrency"],
                                                     message["window_s"], message["warm_up_s"], progress=False))
            reply = {"latencies_s": row.latencies_s, "wall_s": row.wall_s, "results": row.results,
                     "cpu_s": time.process_time() - t_cpu}
        except Exception as exc:  # noqa: BLE001 (reported to the benchmark, which raises it)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    loop.run_until_complete(client.close())
    loop.close()
    return 0


class KeepAliveClient:
    """The gateway rows' load generator: HTTP/1.1 keep-alive over asyncio streams, one connection per
    request in flight, pre-encoded bodies. It shares this machine's cores with the gateway, so it does
    as little work as it can (as wrk would); httpx costs several times more CPU per request."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> bytes:
        request = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (path.encode(), self.host.encode(), len(body), body))
        while True:
            reused = bool(self._idle)
            reader, writer = self._idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                if not reused:
                    raise
                # else: the server's keep-alive timeout closed this idle connection; take another
        status = int(head[9:12])
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if match is None:
            writer.close()
            raise RuntimeError(f"gateway answered {status} without Content-Length")
        data = await reader.readexactly(int(match.group(1)))
        self._idle.append((reader, writer))
        if status != 200:
            raise RuntimeError(f"gateway answered {status}: {data[:300]!r}")
        return data

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def batch_totals(client: Any) -> tuple[float, float, float, float]:
    """(requests, batches, busy worker-seconds, workers) of the gateway's engine so far, from its
    Prometheus metrics."""
    text = (await client.get("/metrics")).text
    values = dict(re.findall(r"^gream_engine_batch_size_(sum|count) (\S+)$", text, flags=re.MULTILINE))
    busy = re.search(r"^gream_engine_busy_seconds_total (\S+)$", text, flags=re.MULTILINE)
    workers = re.search(r"^gream_engine_workers (\S+)$", text, flags=re.MULTILINE)
    return (float(values.get("sum", 0)), float(values.get("count", 0)), float(busy.group(1)) if busy else 0.0,
            float(workers.group(1)) if workers else 1.0)


# ------------------------------------------------------------------------------------------ report


def agreement(row: Row, ref: Row | None) -> float | None:
    if ref is None or not row.results or len(row.results) != len(ref.results):
        return None
    return sum(a == b for a, b in zip(row.results, ref.results)) / len(ref.results)


def table(rows: Sequence[Row], refs: dict[int, Row]) -> str:
    head = ["engine", "conc.", "req/s", "p50 ms", "p99 ms", "x ref req/s", "same top-10 as ref", "note"]
    lines = [head]
    for r in rows:
        ref = refs.get(r.concurrency)
        ratio = f"{r.rps / ref.rps:.2f}x" if ref is not None and ref.rps > 0 else "-"
        agree = agreement(r, ref)
        lines.append([r.engine, str(r.concurrency), f"{r.rps:.2f}", f"{r.pct(50):.1f}", f"{r.pct(99):.1f}", ratio,
                      "-" if agree is None else f"{agree:.3f}", r.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines[1:])])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="var/demo-bundle", help="bundle folder with a model")
    parser.add_argument("--requests", type=int, default=64, help="requests per row")
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
                        help="engines take turns on this many slices of the requests (this machine is noisy)")
    parser.add_argument("--window", type=float, default=3.0,
                        help="seconds of each gateway round (after 0.5 s of warm-up), and of its paired bare round")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every engine (default: torch's choice, all cores); for the "
                             "gateway's transformers engine and its bare twin, threads per worker "
                             "(GREAM_TORCH_THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loadgen", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen is not None:
        return loadgen_main(args.loadgen)

    import torch

    from model_store.bundle import load_bundle
    from model_store.tokens import direct_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
        args.gateway_env.append(f"GREAM_TORCH_THREADS={args.threads}")

    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    bundle_dir = Path(args.bundle).resolve()
    bundle = load_bundle(bundle_dir)
    histories, source = make_histories(bundle, args.requests, args.seed)
    prompts = [direct_prompt([bundle.spelled_id(i) for i in h]) for h in histories]
    print(f"bundle {bundle_dir} ({len(bundle.items)} items, {bundle.trie.depth}-token IDs), {len(prompts)} "
          f"requests from {source}, k={K}, beams={BEAMS}, dtype={args.dtype}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    rows: list[Row] = []
    refs: dict[int, Row] = {}
    pairs: list[tuple[Row, Row]] = []
    if engines & {"reference", "hf"}:
        from service.engine.hf_decoder import HFTrieDecoder

        model, tok, code_tokens = load_hf(bundle, args.dtype)
        sync: dict[str, Callable[[Sequence[str]], list[list[int]]]] = {}
        ref_name = "reference: HF generate(num_beams=10, prefix_allowed_tokens_fn)"
        if "reference" in engines:
            sync[ref_name] = ReferenceDecoder(model, tok, bundle, code_tokens)
        if "hf" in engines:
            from service.engine.shared_prefix import make_decoder

            # Both transformers decoders: the engine uses make_decoder's choice (shared prefix for
            # Llama-family models); HFTrieDecoder copies the prompt cache to the beams once.
            decoders = {"transformers: HFTrieDecoder": HFTrieDecoder(model, tok, bundle.trie, code_tokens)}
            fastest = make_decoder(model, tok, bundle.trie, code_tokens)
            if type(fastest) is not HFTrieDecoder:
                decoders[f"transformers: {type(fastest).__name__} (engine default)"] = fastest
            for name, dec in decoders.items():

                def hf(chunk: Sequence[str], dec=dec) -> list[list[int]]:
                    return [[it.index for it in items]
                            for items in dec.topk(chunk, [K] * len(chunk), [BEAMS] * len(chunk))]

                sync[name] = hf
        for fn in sync.values():
            fn(prompts[:2])  # warm-up
        for c in concurrencies:
            measured = run_interleaved(sync, prompts, c, args.rounds)
            if ref_name in measured:
                refs[c] = measured[ref_name]
            rows += measured.values()
    if "vllm" in engines:
        try:
            rows += asyncio.run(bench_vllm(bundle, prompts, args.dtype, concurrencies))
        except ImportError as exc:
            print(f"vllm row skipped: {exc}", file=sys.stderr)
    if "gateway" in engines:
        gateway_engine = args.gateway_engine
        if gateway_engine == "auto":
            top = max(concurrencies)
            cands = {("vllm" if r.engine.startswith("vllm") else "transformers"): r.rps for r in rows
                     if r.concurrency == top and r.engine.startswith(("vllm", "transformers"))}
            gateway_engine = max(cands, key=cands.get) if cands else "transformers"
        extra_env = dict(kv.split("=", 1) for kv in args.gateway_env)
        pairs = asyncio.run(bench_gateway(bundle_dir, bundle, histories, gateway_engine, args.dtype, concurrencies,
                                          extra_env=extra_env, rounds=args.rounds, window_s=args.window))
        rows += [row for pair in pairs for row in pair]

    print()
    print(table(rows, refs))
    for bare, gateway in pairs:
        share = gateway.rps / bare.rps if bare.rps > 0 else float("nan")
        latency = gateway.pct(50) / bare.pct(50) if bare.pct(50) > 0 else float("nan")
        print(f"gateway at concurrency {gateway.concurrency}: {share * 100:.0f} % of its bare engine's req/s, "
              f"p50 x{latency:.2f} (target: >= 87 % of the req/s, i.e. <= 15 % overhead)")
    if args.json:
        out = [{"engine": r.engine, "concurrency": r.concurrency, "rps": round(r.rps, 3),
                "p50_ms": round(r.pct(50), 2), "p99_ms": round(r.pct(99), 2),
                "same_top10_as_reference": agreement(r, refs.get(r.concurrency))} for r in rows]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
