"""Gateway fixtures: one real TransformersEngine on the tiny bundle for the whole session (on the
session event loop, since its micro-batcher lives there), apps built around it, the real Redis
(db 15, a fresh key namespace per test, cleaned afterwards) and a real uvicorn server when a test
needs real sockets (client disconnects, remote workers).

Tests that use these fixtures mark themselves `pytest.mark.asyncio(loop_scope="session")`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from loadtests.harness import free_port
from tests.support.redis_db import REDIS_URL, delete_namespace_async, new_namespace


@pytest.fixture(scope="session")
def gw_bundle(tiny_bundle_dir: Path) -> Any:
    from model_store.bundle import load_bundle

    return load_bundle(tiny_bundle_dir)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def gw_engine(gw_bundle: Any) -> AsyncIterator[Any]:
    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    # Two workers (the default on two or more cores), named so that one-core machines test them too.
    engine = TransformersEngine(gw_bundle, TransformersEngineConfig(default_beams=10, max_batch=32, batch_wait_ms=2,
                                                                    workers=2, torch_threads=1))
    await engine.start()
    yield engine
    await engine.close()


@pytest_asyncio.fixture(loop_scope="session")
async def redis_namespace() -> AsyncIterator[str]:
    """A key namespace of this test's own on db 15; only its keys are deleted afterwards."""
    namespace = new_namespace()
    yield namespace
    await delete_namespace_async(namespace)


def gw_settings(tiny_bundle_dir: Path, **overrides: Any) -> Any:
    from service.config import Settings

    base: dict[str, Any] = {"bundle": tiny_bundle_dir, "log_json": False}
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def make_client(tiny_bundle_dir: Path, gw_engine: Any, redis_namespace: str
                ) -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """`async with make_client(**settings) as client`: an app (lifespan run) behind an in-process
    ASGI client. Uses the shared engine and the real Redis unless told otherwise."""

    @asynccontextmanager
    async def factory(engine: Any = None, history_store: Any = None, **overrides: Any
                      ) -> AsyncIterator[httpx.AsyncClient]:
        from service.app import create_app

        overrides.setdefault("redis_url", REDIS_URL)
        overrides.setdefault("redis_namespace", redis_namespace)
        settings = gw_settings(tiny_bundle_dir, **overrides)
        app = create_app(settings, engine=engine or gw_engine, history_store=history_store)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client

    return factory


@pytest.fixture
def serve_app() -> Callable[[Any], AbstractAsyncContextManager[str]]:
    """`async with serve_app(app) as base_url`: a real uvicorn server (see running_server)."""
    return running_server


@pytest.fixture
def gateway_settings(tiny_bundle_dir: Path) -> Callable[..., Any]:
    return lambda **overrides: gw_settings(tiny_bundle_dir, **overrides)


@asynccontextmanager
async def running_server(app: Any, startup_timeout_s: float = 10.0) -> AsyncIterator[str]:
    """Serve `app` with a real uvicorn on a free loopback port, in this event loop."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    for _ in range(int(startup_timeout_s / 0.025)):
        if server.started or task.done():
            break
        await asyncio.sleep(0.025)
    if not server.started:
        task.cancel()
        raise RuntimeError(f"uvicorn did not start on port {port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


@pytest.fixture(scope="module")
def bundle(gw_bundle: Any) -> Any:
    """The tiny bundle, as the engine tests name it."""
    return gw_bundle


@pytest.fixture(scope="module")
def hf(bundle: Any) -> Any:
    """The plain HF trie decoder that the engines' items and scores are checked against."""
    from transformers import AutoTokenizer

    from model_store.model import load_bundle_model
    from model_store.tokens import id_token_ids
    from service.engine.hf_decoder import HFTrieDecoder

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    return HFTrieDecoder(load_bundle_model(bundle.model_path), tok, bundle.trie,
                         id_token_ids(tok, bundle.id_format))
