"""Prometheus metrics, `gream_`-prefixed, in a per-app registry (so tests can build several apps).

Route labels are the route templates (`/v1/users/{user_id}/events`), never raw paths, so label
cardinality stays bounded whatever the clients send.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ITEM_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gream_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("gream_http_request_duration_seconds",
                                 "HTTP request latency (to the last byte) by route, method and status",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_reasoning_token = Histogram(
            "gream_reasoning_first_token_seconds", "time from request to the first reasoning delta",
            buckets=LATENCY_BUCKETS, registry=r)
        self.reasoning_tokens = Histogram("gream_reasoning_tokens", "reasoning tokens per streamed request",
                                          buckets=TOKEN_BUCKETS, registry=r)
        self.engine_queue_depth = Gauge("gream_engine_queue_depth", "requests waiting for the engine",
                                        registry=r)
        self.engine_running = Gauge("gream_engine_running", "requests the engine is working on", registry=r)
        self.engine_batch_size = Histogram("gream_engine_batch_size", "requests per engine batch",
                                           buckets=BATCH_BUCKETS, registry=r)
        # Seconds the engine's workers spent on batches, summed over workers; its rate divided by
        # gream_engine_workers is the engine's utilisation (1 = never idle).
        self.engine_busy = Counter("gream_engine_busy_seconds_total",
                                   "seconds the engine's workers spent running batches, summed over workers",
                                   registry=r)
        self.engine_workers = Gauge("gream_engine_workers", "engine workers that run batches side by side",
                                    registry=r)
        self.engine_rejected = Counter("gream_engine_rejected_total",
                                       "requests refused by the engine", ["reason"], registry=r)
        self.items_returned = Histogram("gream_items_returned", "items per recommendation response",
                                        ["source"], buckets=ITEM_BUCKETS, registry=r)
        self.history_cache = Counter("gream_history_cache_total", "history lookups in the store",
                                     ["result"], registry=r)
        self.redis_errors = Counter("gream_redis_errors_total", "failed Redis operations", ["op"], registry=r)
        self.stream_disconnects = Counter("gream_stream_disconnects_total",
                                          "streams the client abandoned before the end", registry=r)
        self.info = Gauge("gream_build_info", "bundle and engine being served (1) or no longer served (0)",
                          ["model_version", "engine"], registry=r)
        self.model_swaps = Counter("gream_model_swaps_total", "model version activations by outcome "
                                   "(swapped, refused, pending: no engine worker holds it yet)", ["outcome"], registry=r)
        self.model_loading = Gauge("gream_model_loading", "1 while a new model version is loading", registry=r)
        self.history_items_dropped = Counter("gream_history_items_dropped_total", "cached history items that the "
                                             "served version's catalog lacks, left out of prompts", registry=r)
        self.served = Counter("gream_recommendations_total", "recommendations answered, by model version and mode",
                              ["model_version", "mode"], registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        """The engines' batch hook: one batch of `size` requests that took `seconds`."""
        self.engine_batch_size.observe(size)
        self.engine_busy.inc(seconds)

    def bind_engine_stats(self, stats: Callable[[], object]) -> None:
        """Read queue depth and running count from the engine at scrape time."""
        self.engine_queue_depth.set_function(lambda: float(getattr(stats(), "queue_depth", 0)))
        self.engine_running.set_function(lambda: float(getattr(stats(), "running", 0)))
        self.engine_workers.set_function(lambda: float(getattr(stats(), "extra", {}).get("workers", 1)))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
