"""Locust scenarios for GREAM Serve, weighted like production traffic.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000              (web UI)
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \
        --csv var/loadtest/run --html var/loadtest/run.html                    (what `make loadtest` does)
    locust -f loadtests/locustfile.py ... ProductBackend --tags direct         only direct recommendations
    locust -f loadtests/locustfile.py ... StreamingClient                      only streaming

User classes (picked 4:1 when both run):
  ProductBackend   product backends: direct recommendations with the history in the body (weight 6),
                   recommendations from the cached history (2), event ingestion (3), item lookups (1)
  StreamingClient  UIs: streamed reasoning, with "time to first token" reported as its own stat
                   (request type SSE) and the whole stream as "stream complete"

Histories are sampled from `--histories` (env GREAM_LOAD_HISTORIES): JSON Lines with `history` or
`item_ids` (the shared and demo data layouts) or a JSON list of lists. Default: the demo data
(var/demo-bundle-data/test.jsonl) when present, else random histories over item ids the server itself
hands out (its popular-items fallback), each checked with GET /v1/items/{id}. Ids the server does not
know are dropped (checked against `items.jsonl` beside the histories file when there is one, else
with GET /v1/items/{id}), so every request is valid and any failure is the server's.

Pass/fail, checked when locust quits (exit code 1 on a breach): failure ratio <= --max-failure-ratio,
p95 of direct recommendations <= --p95-ms, p95 of time to first token <= --ttft-p95-ms.
Every option also reads an environment variable (GREAM_LOAD_*), see `--help`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, ClassVar

from locust import FastHttpUser, between, events, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner

log = logging.getLogger("gream.loadtest")

ROOT = Path(__file__).resolve().parents[1]
DEMO_HISTORIES = ROOT / "var" / "demo-bundle-data" / "test.jsonl"
MAX_HISTORIES = 20_000
TTFT_NAME = "time to first token"
STREAM_NAME = "stream complete"
DIRECT_NAME = "/v1/recommendations"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--histories", env_var="GREAM_LOAD_HISTORIES", default="",
                        help="JSON Lines (history / item_ids) or a JSON list of lists of item ids")
    parser.add_argument("--api-key", env_var="GREAM_LOAD_API_KEY", default="", help="bearer key for /v1")
    parser.add_argument("--k", env_var="GREAM_LOAD_K", type=int, default=10, help="items per request")
    parser.add_argument("--reasoning-tokens", env_var="GREAM_LOAD_REASONING_TOKENS", type=int, default=32,
                        help="max_reasoning_tokens of streamed requests")
    parser.add_argument("--user-pool", env_var="GREAM_LOAD_USER_POOL", type=int, default=1000,
                        help="distinct user ids for events and cached-history requests")
    parser.add_argument("--max-failure-ratio", env_var="GREAM_LOAD_MAX_FAILURE_RATIO", type=float, default=0.01)
    parser.add_argument("--p95-ms", env_var="GREAM_LOAD_P95_MS", type=float, default=2000.0,
                        help="p95 bound of direct recommendations (ms); 0 disables")
    parser.add_argument("--ttft-p95-ms", env_var="GREAM_LOAD_TTFT_P95_MS", type=float, default=3000.0,
                        help="p95 bound of the time to first token (ms); 0 disables")
    parser.add_argument("--seed", env_var="GREAM_LOAD_SEED", type=int, default=0)
    parser.add_argument("--request-log", env_var="GREAM_LOAD_REQUEST_LOG", default="",
                        help="write every request (end time, type, name, ms, error) to this CSV, for analyses "
                             "by time window such as loadtests/rollout_run.py")


_request_log: Any = None


@events.test_start.add_listener
def _open_request_log(environment: Environment, **_: Any) -> None:
    global _request_log
    path = getattr(environment.parsed_options, "request_log", "")
    if path:
        _request_log = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed at quit)
        _request_log.write("end_s,type,name,ms,error\n")


@events.request.add_listener
def _log_request(request_type: str, name: str, response_time: float, exception: Any = None, **_: Any) -> None:
    if _request_log is not None:
        error = "" if exception is None else str(exception).replace(",", ";").replace("\n", " ")[:200]
        _request_log.write(f"{time.time():.4f},{request_type},{name},{response_time:.2f},{error}\n")


@events.quitting.add_listener
def _close_request_log(**_: Any) -> None:
    if _request_log is not None:
        _request_log.close()


# ------------------------------------------------------------------ test data
class Data:
    histories: ClassVar[list[list[str]]] = []
    item_ids: ClassVar[list[str]] = []
    source = "none"


def _read_histories(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    rows: list[Any]
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for row in rows[:MAX_HISTORIES]:
        seq = (row.get("history") or row.get("item_ids") or []) if isinstance(row, dict) else row
        seq = [str(i) for i in seq][-50:]
        if seq:
            out.append(seq)
    return out


def _auth(options: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}


def _known_ids(host: str, options: Any, ids: set[str], limit: int = 2000) -> set[str]:
    """The subset of `ids` the server knows (GET /v1/items/{id}); at most `limit` are asked about."""
    import httpx

    known = set()
    with httpx.Client(base_url=host, headers=_auth(options), timeout=10) as client:
        for item_id in sorted(ids)[:limit]:
            if client.get(f"/v1/items/{item_id}").status_code == 200:
                known.add(item_id)
    return known


def _server_items(host: str, options: Any) -> list[str]:
    """Item ids the server hands out: its popular-items fallback for a user with no history."""
    import httpx

    with httpx.Client(base_url=host, headers=_auth(options), timeout=30) as client:
        resp = client.post("/v1/recommendations", json={"history": [], "k": 100, "exclude_seen": False})
        if resp.status_code == 422:  # a server with a smaller max_k
            resp = client.post("/v1/recommendations", json={"history": [], "k": 10, "exclude_seen": False})
        resp.raise_for_status()
        return [item["item_id"] for item in resp.json()["items"]]


def prepare(environment: Environment) -> None:
    options = environment.parsed_options
    host = (environment.host or "").rstrip("/")
    rng = random.Random(options.seed if options else 0)
    path = Path(options.histories) if options and options.histories else (
        DEMO_HISTORIES if DEMO_HISTORIES.is_file() else None)
    histories: list[list[str]] = []
    if path is not None:
        histories = _read_histories(path)
        wanted = {i for h in histories for i in h}
        catalog = path.parent / "items.jsonl"
        if catalog.is_file():
            known = {str(json.loads(line)["item_id"]) for line in catalog.open() if line.strip()}
        else:
            known = _known_ids(host, options, wanted)
        unknown = wanted - known
        # the server may hold a subset of the file's catalog: verify a sample of ids against it
        sample = rng.sample(sorted(wanted & known), min(20, len(wanted & known)))
        missing = set(sample) - _known_ids(host, options, set(sample))
        if missing:
            log.warning("%d of %d sampled ids unknown to the server: checking all", len(missing), len(sample))
            unknown |= wanted - _known_ids(host, options, wanted, limit=len(wanted))
        histories = [[i for i in h if i not in unknown] for h in histories]
        histories = [h for h in histories if h]
        Data.source = f"{path} ({len(unknown)} unknown ids dropped)"
    items = _server_items(host, options)
    if not histories:
        rng2 = random.Random(rng.random())
        histories = [rng2.sample(items, rng2.randint(1, min(10, len(items)))) for _ in range(2000)]
        Data.source = f"random over {len(items)} server-provided item ids"
    Data.histories[:] = histories
    Data.item_ids[:] = sorted({i for h in histories for i in h} | set(items))
    log.info("load data: %d histories, %d item ids, from %s", len(histories), len(Data.item_ids), Data.source)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    if not Data.histories:
        prepare(environment)


# ------------------------------------------------------------------ users
class _GreamUser(FastHttpUser):
    abstract = True
    # Each virtual user keeps one connection, like a backend's pooled client.
    concurrency = 1

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.k = options.k if options else 10
        self.reasoning_tokens = options.reasoning_tokens if options else 32
        self.user_pool = options.user_pool if options else 1000
        self.headers = {"Content-Type": "application/json", **(_auth(options) if options else {})}
        if not Data.histories:
            prepare(self.environment)

    def history(self) -> list[str]:
        return random.choice(Data.histories)

    def user_id(self) -> str:
        return f"load-{random.randrange(self.user_pool)}"

    def fail(self, resp: Any) -> None:
        """Mark a non-2xx as failed; on 429/503 back off for Retry-After like a well-behaved client."""
        resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
        if resp.status_code in (429, 503):
            try:
                delay = float((resp.headers or {}).get("Retry-After", 1))
            except ValueError:
                delay = 1.0
            time.sleep(min(max(delay, 0.1), 10.0))

    def check_items(self, resp: Any, body: dict[str, Any]) -> None:
        items = body.get("items") or []
        ids = [i["item_id"] for i in items]
        if len(ids) != len(set(ids)):
            resp.failure(f"duplicate items in {ids}")
        elif not ids:
            resp.failure("no items")


class ProductBackend(_GreamUser):
    """Backends asking for recommendations and posting interactions."""

    weight = 4
    wait_time = between(0.0, 0.05)

    @tag("direct")
    @task(6)
    def recommend_with_history(self) -> None:
        history = self.history()
        with self.client.post("/v1/recommendations", name=DIRECT_NAME, headers=self.headers,
                              json={"history": history, "k": self.k, "exclude_seen": True},
                              catch_response=True) as resp:
            if resp.status_code != 200:
                self.fail(resp)
                return
            body = resp.json()
            self.check_items(resp, body)
            seen = set(history) & {i["item_id"] for i in body["items"]}
            if seen and not body.get("fallback"):
                resp.failure(f"exclude_seen violated: {sorted(seen)}")

    @tag("cached")
    @task(2)
    def recommend_from_cache(self) -> None:
        with self.client.post("/v1/recommendations", name="/v1/recommendations (cached history)",
                              headers=self.headers, json={"user_id": self.user_id(), "k": self.k},
                              catch_response=True) as resp:
            if resp.status_code != 200:
                self.fail(resp)
            else:
                self.check_items(resp, resp.json())

    @tag("events")
    @task(3)
    def post_events(self) -> None:
        n = random.randint(1, 3)
        now = time.time()
        events_ = [{"item_id": random.choice(Data.item_ids), "timestamp": now + i} for i in range(n)]
        with self.client.post(f"/v1/users/{self.user_id()}/events", name="/v1/users/{user_id}/events",
                              headers=self.headers, json={"events": events_}, catch_response=True) as resp:
            if resp.status_code != 202:
                self.fail(resp)

    @tag("items")
    @task(1)
    def get_item(self) -> None:
        self.client.get(f"/v1/items/{random.choice(Data.item_ids)}", name="/v1/items/{item_id}",
                        headers=self.headers)


class StreamingClient(_GreamUser):
    """UIs streaming the model's reasoning, then the items."""

    weight = 1
    wait_time = between(0.0, 0.2)

    @tag("stream")
    @task
    def stream(self) -> None:
        body = {"history": self.history(), "k": self.k, "max_reasoning_tokens": self.reasoning_tokens}
        fire = self.environment.events.request.fire
        started = time.perf_counter()
        first: float | None = None
        seen: list[str] = []
        error: Exception | None = None
        size = 0
        with self.client.post("/v1/recommendations/stream", name="/v1/recommendations/stream",
                              headers={**self.headers, "Accept": "text/event-stream"}, json=body,
                              stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                if resp.status_code in (429, 503):
                    time.sleep(min(float((resp.headers or {}).get("Retry-After", 1) or 1), 10.0))
                return
            try:
                # Line by line: the response's read(n) waits for n bytes, which would hold back the
                # first small SSE frame and inflate the time to first token.
                raw = resp._response
                event, data = "", ""
                while True:
                    line = raw.readline(b"\n")
                    if not line:
                        break
                    size += len(line)
                    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                    if text.startswith("event: "):
                        event = text[7:]
                    elif text.startswith("data: "):
                        data = text[6:]
                    elif text == "" and event:
                        seen.append(event)
                        if first is None and event in ("reasoning", "items"):
                            first = time.perf_counter()
                            fire(request_type="SSE", name=TTFT_NAME, response_time=(first - started) * 1000,
                                 response_length=0, exception=None, context={})
                        if event == "error":
                            raise RuntimeError(f"error event: {data[:200]}")
                        event, data = "", ""
                if not seen or seen[-1] != "done" or "items" not in seen:
                    raise RuntimeError(f"stream ended without items/done: {seen[-3:]}")
                order = [e for e in seen if e != "reasoning"]
                if order != ["items", "done"]:
                    raise RuntimeError(f"unexpected event order {order}")
            except Exception as exc:  # noqa: BLE001 - everything is a load-test failure
                error = exc
                resp.failure(str(exc))
            else:
                resp.success()
        fire(request_type="SSE", name=STREAM_NAME, response_time=(time.perf_counter() - started) * 1000,
             response_length=size, exception=error, context={})


# ------------------------------------------------------------------ pass / fail
def _p95(environment: Environment, name: str, method: str) -> tuple[float, int]:
    entry = environment.stats.entries.get((name, method))
    if entry is None or entry.num_requests == 0:
        return 0.0, 0
    return float(entry.get_response_time_percentile(0.95)), entry.num_requests


def verdict(environment: Environment) -> list[str]:
    options = environment.parsed_options
    max_fail = options.max_failure_ratio if options else 0.01
    p95_ms = options.p95_ms if options else 2000.0
    ttft_ms = options.ttft_p95_ms if options else 3000.0
    total = environment.stats.total
    problems = []
    if total.num_requests == 0:
        problems.append("no requests were made")
    elif total.fail_ratio > max_fail:
        problems.append(f"failure ratio {total.fail_ratio:.4f} > {max_fail}")
    p95, n = _p95(environment, DIRECT_NAME, "POST")
    if p95_ms and n and p95 > p95_ms:
        problems.append(f"p95 of direct recommendations {p95:.0f} ms > {p95_ms:.0f} ms")
    p95, n = _p95(environment, TTFT_NAME, "SSE")
    if ttft_ms and n and p95 > ttft_ms:
        problems.append(f"p95 of time to first token {p95:.0f} ms > {ttft_ms:.0f} ms")
    return problems


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    problems = verdict(environment)
    if problems:
        log.error("load test FAILED: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        total = environment.stats.total
        log.info("load test passed: %d requests, failure ratio %.4f", total.num_requests, total.fail_ratio)
        if environment.process_exit_code is None:
            environment.process_exit_code = 0
