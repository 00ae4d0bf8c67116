"""The gateway's lifespan: history store, the first model version, and the registry watcher.

`app.state.host` (service.rollout.ModelHost) holds the deployment being served; routes lease it per
request (service.api.deps). With a registry (`--registry ROOT`) the gateway follows its `current`
pointer; with a bundle folder it serves that bundle until it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from model_store.bundle import load_bundle
from model_store.registry import Registry, resolve_bundle_dir
from service.config import Settings
from service.engine.base import Engine
from service.engine.factory import engine_class
from service.engine_settings import create_engine
from service.history import HistoryStore, create_history_store
from service.metrics import Metrics
from service.recommender import Recommender
from service.rollout import Deployment, ModelHost, RegistryWatcher, VersionPending
from service.runtime import freeze_heap
from service.search import TitleIndex

log = logging.getLogger("gream")


def first_bundle_dir(settings: Settings) -> Path:
    """The registry's current version, or the bundle folder (itself possibly a registry root)."""
    if settings.registry is not None:
        current = Registry(settings.registry).current()
        if current is None:
            raise FileNotFoundError(f"registry {settings.registry} has no current version; "
                                    "publish one with `gream registry publish DIR --activate`")
        return current
    return resolve_bundle_dir(settings.bundle)


class DeploymentBuilder:
    """Builds, starts and warms the deployment of one bundle version for this gateway."""

    def __init__(self, settings: Settings, metrics: Metrics, store: HistoryStore):
        self.settings, self.metrics, self.store = settings, metrics, store
        if not settings.engine_urls and not settings.use_engine_subprocess:
            engine_class(settings.engine)  # imported here, not in a frame that holds an engine

    async def __call__(self, bundle_dir: Path) -> Deployment:
        bundle = await asyncio.to_thread(load_bundle, bundle_dir)  # verifies every file's hash
        engine = create_engine(self.settings, bundle)
        self.metrics.model_loading.set(1)
        try:
            await self.start_engine(engine)
            if not engine.ready:  # remote workers not (yet) on this version
                raise VersionPending(f"no engine worker serves version {bundle.version} yet")
        except BaseException:
            await engine.close()
            raise
        finally:
            self.metrics.model_loading.set(0)
        return await self.deployment(bundle, engine, owns_engine=True)

    async def start_engine(self, engine: Engine) -> None:
        if hasattr(engine, "on_batch"):
            engine.on_batch = self.metrics.observe_batch  # type: ignore[attr-defined]
        if not engine.ready:
            await engine.start()

    async def deployment(self, bundle: Any, engine: Engine, owns_engine: bool) -> Deployment:
        search = await asyncio.to_thread(TitleIndex.from_bundle, bundle)
        s = self.settings
        recommender = Recommender(bundle, engine, self.store, history_cap=s.history_cap,
                                  drop_chunk=s.history_drop_chunk, metrics=self.metrics, use_prior=s.use_prior,
                                  reasoning_answer=s.reasoning_answer)
        return Deployment(bundle, engine, recommender, search, owns_engine=owns_engine)


def _publish(app: FastAPI, metrics: Metrics) -> Any:
    def on_swap(deployment: Deployment) -> None:
        previous = app.state.bundle
        if previous is not None and app.state.engine is not None:
            metrics.info.labels(previous.version, app.state.engine.name).set(0)
        app.state.bundle, app.state.engine = deployment.bundle, deployment.engine
        app.state.recommender, app.state.search = deployment.recommender, deployment.search
        metrics.info.labels(deployment.version, deployment.engine.name).set(1)

    return on_swap


def gateway_lifespan(settings: Settings, metrics: Metrics, engine: Engine | None,
                     history_store: HistoryStore | None) -> Any:
    """The lifespan of `create_app`. An `engine` or `history_store` passed in is used as is and left
    open on shutdown (the caller owns it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = history_store or create_history_store(
            settings, on_error=lambda op: metrics.redis_errors.labels(op).inc())
        await store.connect()
        app.state.history = store
        build = DeploymentBuilder(settings, metrics, store)
        # An engine worker keeps a replaced version a while, for gateways that have not switched yet.
        linger = 2 * settings.registry_poll_s + 5 if settings.expose_engine_api and settings.registry else 0.0
        host = ModelHost(build, metrics=metrics, drain_timeout_s=settings.swap_drain_timeout_s, linger_s=linger,
                         on_swap=_publish(app, metrics))
        metrics.bind_engine_stats(lambda: host.current.engine.stats() if host.current else None)
        previous_hook = getattr(engine, "on_batch", None)
        watcher: RegistryWatcher | None = None
        try:
            if engine is not None:
                bundle = getattr(engine, "bundle", None)  # a remote engine has none: it serves the settings'
                if bundle is None:
                    bundle = await asyncio.to_thread(lambda: load_bundle(first_bundle_dir(settings)))
                await build.start_engine(engine)
                first = await build.deployment(bundle, engine, owns_engine=False)
            else:
                first = await build(await asyncio.to_thread(first_bundle_dir, settings))
            host.start(first)
            del first  # the host alone holds it, so a swap can free it
            app.state.host = host
            if settings.registry is not None:
                watcher = RegistryWatcher(Registry(settings.registry), host, settings.registry_poll_s)
                watcher.start()
            app.state.watcher = watcher
            freeze_heap()
            app.state.starting = False
            log.info("gateway ready", extra={"model_version": host.current.version, "engine": host.current.engine.name,
                                             "history_store": store.kind, "auth": settings.auth_enabled,
                                             "registry": str(settings.registry) if settings.registry else None})
            yield
        finally:
            app.state.host = app.state.watcher = None
            app.state.engine = app.state.recommender = None
            if watcher is not None:
                await watcher.close()
            await host.close()
            if engine is not None and hasattr(engine, "on_batch"):
                engine.on_batch = previous_hook  # type: ignore[attr-defined]
            if history_store is None:
                await store.close()

    return lifespan
