"""Live model rollout: the gateway serves one bundle version at a time and swaps to another under load.

A `Deployment` is everything that serves one version: bundle, engine, recommender, title index. Each
request leases the current deployment for its whole life (the stream included), so a swap never changes
the model under a request. `ModelHost.activate` loads and warms the new version beside the old one,
switches new requests to it in one assignment, waits for the old one's leases to end (bounded), then
closes it: two versions are alive only during a swap. A version that fails to load is refused and the
old one keeps serving. `RegistryWatcher` follows a registry's `current` pointer (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from model_store.bundle import Bundle, read_manifest
from model_store.registry import Registry
from service.engine.base import Engine, EngineUnavailable
from service.metrics import Metrics
from service.recommender import Recommender
from service.search import TitleIndex

log = logging.getLogger("gream.rollout")


@dataclass(eq=False)
class Deployment:
    """One served bundle version and what serves it."""

    bundle: Bundle
    engine: Engine
    recommender: Recommender
    search: TitleIndex
    owns_engine: bool = True  # an engine passed in by the caller (tests) is not closed on retirement
    leases: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.drained.set()

    @property
    def version(self) -> str:
        return self.bundle.version

    def acquire(self) -> None:
        self.leases += 1
        self.drained.clear()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self.drained.set()


BuildDeployment = Callable[[Path], Awaitable[Deployment]]  # loads, starts and warms a version


class VersionRefused(RuntimeError):
    """A version that could not be loaded; the one already serving goes on."""


class VersionPending(RuntimeError):
    """A version that cannot be served yet (no engine worker holds it); tried again on the next poll."""


class ModelHost:
    """The deployment being served, and swaps between deployments."""

    def __init__(self, build: BuildDeployment, *, metrics: Metrics | None = None, drain_timeout_s: float = 60.0,
                 linger_s: float = 0.0, on_swap: Callable[[Deployment], None] | None = None):
        self._build = build
        self.metrics = metrics
        self.drain_timeout_s = drain_timeout_s
        # How long a replaced version stays servable after its last lease (engine workers keep it for
        # gateways that have not switched yet; a gateway needs none).
        self.linger_s = linger_s
        self.on_swap = on_swap
        self.current: Deployment | None = None
        self.retiring: Deployment | None = None
        self.loading: str | None = None
        self.refused: dict[str, str] = {}  # version -> why it was refused
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ serving
    @contextlib.asynccontextmanager
    async def lease(self, version: str | None = None) -> AsyncIterator[Deployment]:
        """The current deployment (or the named version while it is still loaded), held until exit."""
        deployment = self.current if version is None else self.find(version)
        if deployment is None:
            raise EngineUnavailable("no model is loaded" if version is None else f"version {version} is not served")
        deployment.acquire()
        try:
            yield deployment
        finally:
            deployment.release()

    def find(self, version: str) -> Deployment | None:
        return next((d for d in (self.current, self.retiring) if d is not None and d.version == version), None)

    @property
    def loaded_versions(self) -> list[str]:
        return [d.version for d in (self.current, self.retiring) if d is not None]

    # ------------------------------------------------------------------ swapping
    def start(self, deployment: Deployment) -> None:
        """Serve a first deployment, built by the caller."""
        self.current = deployment
        if self.on_swap is not None:
            self.on_swap(deployment)

    async def activate(self, bundle_dir: str | Path) -> str:
        """Serve the bundle in `bundle_dir`; returns its version. Raises VersionRefused when it does not load
        (the version already serving goes on)."""
        bundle_dir = Path(bundle_dir)
        async with self._lock:
            version = str(read_manifest(bundle_dir).get("bundle_version", bundle_dir.name))
            if self.current is not None and self.current.version == version:
                return version
            self.loading = version
            started = time.perf_counter()
            try:
                new = await self._build(bundle_dir)
            except VersionPending as exc:
                log.info("model version not servable yet", extra={"model_version": version, "reason": str(exc)})
                self._count("pending")
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.refused[version] = reason
                log.error("model version refused; the serving one goes on",
                          extra={"model_version": version, "error": reason})
                self._count("refused")
                raise VersionRefused(f"version {version} was refused: {reason}") from exc
            finally:
                self.loading = None
            self.refused.pop(version, None)
            old, self.current = self.current, new
            if self.on_swap is not None:
                self.on_swap(new)
            self._count("swapped")
            log.info("model version swapped", extra={"model_version": new.version,
                                                      "previous": old.version if old else None,
                                                      "load_s": round(time.perf_counter() - started, 3)})
            if old is not None:
                await self._retire(old)
                del old
                await self._collect()
            return new.version

    async def _retire(self, old: Deployment) -> None:
        """Let the old version's requests finish (bounded), then close it and free its memory."""
        self.retiring = old
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.drained.wait(), self.drain_timeout_s)
            if old.leases:
                log.warning("closing a model version with requests still on it",
                            extra={"model_version": old.version, "leases": old.leases})
            if self.linger_s:
                await asyncio.sleep(self.linger_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(old.drained.wait(), self.drain_timeout_s)
        finally:
            self.retiring = None
            if old.owns_engine:
                await old.engine.close()

    @staticmethod
    async def _collect() -> None:
        # The long-lived objects were frozen out of the collector's reach when the first version
        # became ready (service.runtime.freeze_heap); thaw them so the old version's cycles are freed.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.model_swaps.labels(outcome).inc()

    async def close(self) -> None:
        async with self._lock:
            for deployment in (self.current, self.retiring):
                if deployment is not None and deployment.owns_engine:
                    await deployment.engine.close()
            self.current = self.retiring = None


class RegistryWatcher:
    """Follows a registry's `current` pointer: polls it, and activates a new version when it moves."""

    def __init__(self, registry: Registry, host: ModelHost, interval_s: float = 5.0):
        self.registry = registry
        self.host = host
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def check(self, retry_refused: bool = False) -> dict[str, str | None]:
        """Activate the registry's current version if it is not the one served. A version refused
        before is tried again only when asked (the admin reload), not on every poll."""
        version = await asyncio.to_thread(self.registry.current_version)
        serving = self.host.current.version if self.host.current else None
        if version is None or version == serving:
            return {"outcome": "unchanged", "model_version": serving}
        if version in self.host.refused and not retry_refused:
            return {"outcome": "refused", "model_version": serving, "error": self.host.refused[version]}
        try:
            await self.host.activate(self.registry.path_of(version))
        except VersionRefused as exc:
            return {"outcome": "refused", "model_version": serving, "error": str(exc)}
        except VersionPending as exc:
            return {"outcome": "pending", "model_version": serving, "error": str(exc)}
        return {"outcome": "swapped", "model_version": version, "previous": serving}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="gream-registry-watcher")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # a broken registry read must not stop the watching
                log.exception("registry check failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
