"""Serving settings: one pydantic-settings model, read from `GREAM_*` environment variables (and an
optional `.env`), with embedded defaults so `gream serve` runs with no configuration at all.

List settings (`GREAM_API_KEYS`, `GREAM_ENGINE_URLS`) accept either JSON (`["a","b"]`) or a plain
comma-separated string, because that is what people type into compose files and Kubernetes manifests.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EngineKind = Literal["transformers", "vllm"]
DType = Literal["float32", "bfloat16", "float16"]


def _split_list(value: Any) -> Any:
    """Accept a JSON list, a comma-separated string, or a real list (CLI overrides)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GREAM_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", validate_default=True)

    # ------------------------------------------------------------------ what to serve, where
    bundle: Path = Field(Path("var/demo-bundle"), description="bundle folder, or a registry root whose `current` "
                                                       "version is served (gream demo writes var/demo-bundle)")
    host: str = Field("127.0.0.1", description="address the HTTP server binds to")
    port: int = Field(8000, ge=1, le=65535, description="port the HTTP server listens on")
    engine: EngineKind = Field("transformers", description="model runtime: PyTorch (transformers) or vLLM's "
                                                         "AsyncLLM (needs the vllm extra)")
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="remote engine workers; when set, the gateway runs no model itself")
    expose_engine_api: bool = Field(False, description="also expose /internal/engine/* so gateways can use "
                                                       "this process as a remote engine worker")
    engine_subprocess: bool | None = Field(
        None, description="run the local engine in a child process, so HTTP work and decoding do not share "
                          "one GIL (service.engine.process); unset = yes for the transformers engine, whose "
                          "beam loop is Python, no for vLLM, whose AsyncLLM decodes in a process of its own")
    registry: Path | None = Field(None, description="registry root to serve and follow: its `current` version "
                                  "is served, and a newly activated version is loaded and swapped in live")
    registry_poll_s: float = Field(5.0, gt=0, le=3600, description="how often the registry's `current` pointer "
                                   "is read")
    swap_drain_timeout_s: float = Field(60.0, gt=0, description="longest wait for a replaced version's requests "
                                        "to finish before it is closed")
    admin_api_key: str | None = Field(None, repr=False, description="bearer key of the admin routes "
                                      "(POST /admin/reload); unset = admin routes refused")
    engine_api_key: str | None = Field(None, repr=False, description="bearer key sent to remote workers")
    engine_timeout_s: float = Field(30.0, gt=0, description="per-call timeout to remote workers")

    # ------------------------------------------------------------------ history store
    redis_url: str | None = Field(None, description="redis://host:port/db; unset = in-memory store")
    redis_namespace: str = Field("gream", pattern=r"^[A-Za-z0-9_.-]{1,32}$",
                                 description="prefix of the Redis keys (NS:v1:hist:USER)")
    redis_max_connections: int = Field(64, ge=1, description="size of the Redis connection pool")
    history_cap: int = Field(50, ge=1, le=10_000, description="items kept per user history, newest")
    history_ttl_days: float = Field(30, gt=0, description="a history expires this long after its last write")
    history_drop_chunk: int = Field(10, ge=1, description="over the cap, drop the oldest items this many at a "
                                    "time, so successive prompts keep their prefix for the prefix cache")
    memory_store_max_users: int = Field(100_000, ge=1, description="users the in-memory store keeps "
                                                                   "(least recently used dropped first)")

    # ------------------------------------------------------------------ gateway limits and auth
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False,
                                                     description="bearer keys for /v1; empty = auth off")
    max_k: int = Field(100, ge=1, le=1000, description="largest k a request may ask for")
    max_history: int = Field(200, ge=1, description="longest history a request may carry, and most events "
                                                    "per events request")
    max_filter_items: int = Field(10_000, ge=1, description="max length of exclude_items / allow_items")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request body limit in bytes (413 past it)")
    max_reasoning_tokens: int = Field(512, ge=1, description="largest reasoning budget a stream may ask for")
    default_reasoning_tokens: int | None = Field(None, ge=1, description="when a stream request gives none; "
                                                 "unset = min(256, max_reasoning_tokens)")

    # ------------------------------------------------------------------ engine tuning
    default_beams: int = Field(10, ge=1, le=1000, description="beam width of the constrained search (at least "
                                                              "k is used)")
    reasoning_answer: Literal["history", "chain"] = Field(
        "history", description="what a stream's items are ranked from: the history, as in direct mode (the "
                               "chain explains the ranking and costs it nothing), or the history and the chain, "
                               "as GREAM's reasoning mode (lost accuracy with the small models measured)")
    use_prior: bool = Field(True, description="fuse the bundle's collaborative prior (model_store.prior) into "
                                              "the beam scores; no effect for bundles without one")
    queue_max: int = Field(256, ge=1, description="requests the engine queues; past it the gateway answers 429 "
                                                  "with Retry-After")
    max_batch: int = Field(32, ge=1, description="largest micro-batch of the transformers engine")
    batch_wait_ms: float = Field(10.0, ge=0, description="longest wait for the next request while a batch is "
                                                         "short of the size of recent ones (a lone caller never "
                                                         "waits)")
    batch_wait_max_ms: float = Field(50.0, ge=0, description="longest wait for a batch to fill, in all")
    max_concurrent_reasoning: int = Field(16, ge=1, description="reasoning streams decoded at once; more are "
                                                                "answered 429 (overloaded)")
    reasoning_temperature: float = Field(0.0, ge=0, description="sampling temperature of the reasoning text; "
                                                                "0 = greedy")
    decode_workers: int | None = Field(None, ge=1, description="decode workers of the transformers engine, each "
                                      "running its own batches; unset = 2 where there are two or more cores")
    torch_threads: int | None = Field(None, ge=1, description="torch threads of each decode worker; unset = "
                                      "torch's thread count divided among the workers")
    dtype: DType = Field("float32", description="dtype the model is loaded in")

    # ------------------------------------------------------------------ presentation
    demo_page: bool = Field(False, description="serve the browser demo page at /demo")
    log_json: bool = Field(True, description="log JSON lines (with the request id); false = plain text")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="lowest level logged")

    # ------------------------------------------------------------------ validation
    @field_validator("engine_urls", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("engine_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"engine URL {url!r} must look like http://host:port")
        return [u.rstrip("/") for u in urls]

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis(cls, url: Any) -> Any:
        if url is None or (isinstance(url, str) and url.strip() in ("", "none", "memory")):
            return None
        scheme = urlsplit(str(url)).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url {url!r} must start with redis://, rediss:// or unix:// "
                             "(leave it unset for the in-memory store)")
        return str(url)

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        short = [k for k in keys if len(k) < 8]
        if short:
            raise ValueError(f"{len(short)} API key(s) are shorter than 8 characters")
        return keys

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_reasoning_tokens and self.default_reasoning_tokens > self.max_reasoning_tokens:
            raise ValueError(f"default_reasoning_tokens ({self.default_reasoning_tokens}) exceeds "
                             f"max_reasoning_tokens ({self.max_reasoning_tokens})")
        if self.history_drop_chunk > self.history_cap:
            raise ValueError(f"history_drop_chunk ({self.history_drop_chunk}) exceeds history_cap "
                             f"({self.history_cap})")
        return self

    # ------------------------------------------------------------------ derived
    @property
    def history_ttl_seconds(self) -> int:
        return max(1, int(self.history_ttl_days * 86400))

    @property
    def reasoning_budget_default(self) -> int:
        return self.default_reasoning_tokens or min(256, self.max_reasoning_tokens)

    @property
    def use_engine_subprocess(self) -> bool:
        """Whether the gateway runs its local engine in a child process (engine_subprocess, or its default)."""
        return self.engine_subprocess if self.engine_subprocess is not None else self.engine == "transformers"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


# Variables that were renamed: a deployment still setting one would otherwise lose it without a word.
RENAMED_VARIABLES = {"GREAM_ENGINE_WORKER": "GREAM_EXPOSE_ENGINE_API",
                     "GREAM_ENGINE_PROCESS": "GREAM_ENGINE_SUBPROCESS",
                     "GREAM_ENGINE_WORKERS": "GREAM_DECODE_WORKERS"}


def check_environment(environ: Mapping[str, str]) -> list[str]:
    """Raise ValueError for a renamed `GREAM_*` variable; return a warning for each unknown one that
    looks like a misspelt setting."""
    renamed = [f"{old} is now {new}" for old, new in RENAMED_VARIABLES.items() if old in environ]
    if renamed:
        raise ValueError("renamed settings: " + "; ".join(renamed) + " (docs/configuration.md)")
    known = {f"GREAM_{name.upper()}" for name in Settings.model_fields}
    warnings = []
    for name in sorted(n for n in environ if n.startswith("GREAM_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            warnings.append(f"{name} is not a setting; did you mean {close[0]}?")
    return warnings


def load_settings(overrides: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Environment and defaults, then explicit overrides (CLI flags; None values mean 'not given')."""
    for warning in check_environment(os.environ if environ is None else environ):
        logging.getLogger("gream.config").warning(warning)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return Settings(**given)
