"""Live rollout: a gateway that follows a registry swaps versions under a steady load of direct and
streaming requests, with zero failed requests, serves the new version's items at once, rolls back the
same way, and frees the replaced version."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import weakref
from pathlib import Path

import httpx
import pytest

from loadtests.harness import parse_metrics
from model_store.catalog import Item
from model_store.registry import Registry
from tests.integration.conftest import REDIS_URL, gw_settings, running_server
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

ADMIN = {"Authorization": "Bearer admin-key-0123"}
NEW_ITEMS = [Item(item_id=f"new-{i}", title=f"Acme rollout gadget {i}", brand="Acme",
                  categories="Lab > gadget", description="An item added by a new version.") for i in range(3)]


@pytest.fixture(scope="module")
def registry(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, str, str]:
    """A registry holding the tiny bundle (current) and a version built from it with `add_items`."""
    from model_store.builder import add_items

    root = tmp_path_factory.mktemp("rollout")
    reg = Registry(root / "registry")
    import numpy as np

    # The tiny bundle was coded from random 16-d vectors, so the new items bring vectors of that size.
    vectors = np.random.default_rng(1).normal(size=(len(NEW_ITEMS), 16)).astype(np.float32)
    v2_dir, _ = add_items(tiny_bundle_dir, NEW_ITEMS, root / "v2", log=lambda *a: None, vectors=vectors)
    v1 = reg.publish(tiny_bundle_dir, activate=True)
    v2 = reg.publish(v2_dir)
    return reg, v1, v2


class Load:
    """Closed-loop callers of the direct and the streaming route until stopped; every answer that is
    not a complete success is a failure."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.failures: list[str] = []
        self.versions: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()

    async def direct(self, n: int) -> None:
        while not self.stop.is_set():
            resp = await self.client.post("/v1/recommendations", json={"history": [f"sku-{n}", f"sku-{n + 1}"], "k": 5})
            if resp.status_code != 200 or len(resp.json()["items"]) != 5:
                self.failures.append(f"direct {resp.status_code}: {resp.text[:200]}")
            else:
                self.versions[resp.json()["model_version"]] += 1

    async def stream(self, n: int) -> None:
        while not self.stop.is_set():
            body = {"history": [f"sku-{n}", f"sku-{n + 2}"], "k": 4, "max_reasoning_tokens": 6}
            async with self.client.stream("POST", "/v1/recommendations/stream", json=body) as resp:
                text = (await resp.aread()).decode()
            events = [block.split("\n", 1)[0].removeprefix("event: ") for block in text.strip().split("\n\n")]
            if resp.status_code != 200 or events[-1] != "done" or "error" in events:
                self.failures.append(f"stream {resp.status_code}: {text[-200:]}")

    def run(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.direct(n)) for n in (1, 5, 9)] + \
               [asyncio.create_task(self.stream(n)) for n in (2, 6)]


async def _served_version(client: httpx.AsyncClient) -> str | None:
    return (await client.get("/readyz")).json()["model_version"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("engine", "subprocess"), [
    ("transformers", False), ("transformers", True), pytest.param("vllm", False, marks=pytest.mark.vllm)],
    ids=["transformers-in-process", "transformers-child-process", "vllm"])
async def test_swap_and_roll_back_under_load(registry: tuple[Registry, str, str], tiny_bundle_dir: Path,
                                             redis_namespace: str, engine: str, subprocess: bool) -> None:
    from service.app import create_app

    reg, v1, v2 = registry
    reg.activate(v1)
    if engine == "vllm":
        pytest.importorskip("vllm", reason="the vLLM CPU engine is not installed")
    settings = gw_settings(tiny_bundle_dir, registry=reg.root, registry_poll_s=0.2, engine=engine,
                           engine_subprocess=subprocess,
                           decode_workers=1, torch_threads=1, redis_url=REDIS_URL, redis_namespace=redis_namespace,
                           admin_api_key=ADMIN["Authorization"].split()[1])
    app = create_app(settings)
    async with running_server(app, startup_timeout_s=300) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        assert await _served_version(client) == v1
        first_engine = weakref.ref(app.state.host.current.engine)
        load = Load(client)
        tasks = load.run()
        try:
            await eventually(lambda: sum(load.versions.values()), until=lambda n: n >= 5)

            reg.activate(v2)  # the watcher notices within a poll
            assert await eventually(lambda: _served_version(client), until=lambda v: v == v2, timeout_s=300) == v2
            new_item = await client.post("/v1/recommendations",
                                         json={"history": ["new-0", "sku-3"], "k": 3, "allow_items": ["new-1", "new-2"]})
            assert new_item.status_code == 200, new_item.text
            assert {i["item_id"] for i in new_item.json()["items"]} == {"new-1", "new-2"}
            events = await client.post("/v1/users/rollout-user/events",
                                       json={"events": [{"item_id": "sku-4"}, {"item_id": "new-0"}]})
            assert events.status_code == 202
            await eventually(lambda: load.versions[v2], until=lambda n: n >= 5)

            reg.activate(v1)  # roll back, this time through the admin route
            reload = await client.post("/admin/reload", headers=ADMIN)
            assert reload.status_code == 200 and reload.json()["model_version"] == v1, reload.text
            cached = await client.post("/v1/recommendations", json={"user_id": "rollout-user", "k": 3})
            assert cached.status_code == 200 and cached.json()["history_used"] == 1, cached.text
            await eventually(lambda: load.versions[v1], until=lambda n: n >= 10)
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)
        assert not load.failures, load.failures[:5]
        assert load.versions[v1] and load.versions[v2]
        metrics = parse_metrics((await client.get("/metrics")).text)
        assert metrics["gream_model_swaps_total"] == 2 and metrics["gream_history_items_dropped_total"] == 1
        ready = (await client.get("/readyz")).json()
        assert ready["loaded_versions"] == [v1] and ready["loading_version"] is None
        gc.collect()
        assert first_engine() is None, "the replaced version's engine is still referenced"


async def test_a_broken_version_is_refused_and_the_old_one_serves_on(registry: tuple[Registry, str, str],
                                                                   tiny_bundle_dir: Path, tmp_path: Path) -> None:
    from service.app import create_app

    reg, v1, _ = registry
    reg.activate(v1)
    broken = reg.root / "versions" / "broken-1"
    broken.mkdir()
    manifest = json.loads((reg.path_of(v1) / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": "broken-1"}))
    settings = gw_settings(tiny_bundle_dir, registry=reg.root, registry_poll_s=0.1, engine_subprocess=False,
                           decode_workers=1, torch_threads=1, admin_api_key=ADMIN["Authorization"].split()[1])
    app = create_app(settings)
    async with running_server(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        try:
            # A version whose files fail their hashes (`activate` would refuse it): point `current` at it
            # by hand, as a corrupted disk or a hand-edited registry would.
            link = reg.root / "current.tmp"
            link.symlink_to(Path("versions") / "broken-1")
            link.replace(reg.root / "current")
            ready = await eventually(lambda: client.get("/readyz"),
                                     until=lambda r: "broken-1" in r.json()["refused_versions"], timeout_s=30)
            assert ready.status_code == 200 and ready.json()["model_version"] == v1
            resp = await client.post("/v1/recommendations", json={"history": ["sku-1"], "k": 3})
            assert resp.status_code == 200 and resp.json()["model_version"] == v1
            reload = await client.post("/admin/reload", headers=ADMIN)
            assert reload.status_code == 200 and reload.json()["outcome"] == "refused"
            assert (await client.post("/admin/reload")).status_code == 401
            metrics = parse_metrics((await client.get("/metrics")).text)
            assert metrics["gream_model_swaps_total"] >= 2  # refused twice, never swapped
        finally:
            reg.activate(v1)
            import shutil

            shutil.rmtree(broken)


async def test_gateway_and_remote_worker_follow_the_registry_under_load(
        registry: tuple[Registry, str, str], tiny_bundle_dir: Path, redis_namespace: str) -> None:
    """Gateway and engine worker each follow the registry; the gateway swaps once the worker holds the
    new version, and the worker keeps the old one until the gateway has moved, so nothing fails and no
    request is decoded on another version than the one it was planned for."""
    from service.app import create_app

    reg, v1, v2 = registry
    reg.activate(v1)
    key = "worker-key-0123"
    common = {"registry": reg.root, "registry_poll_s": 0.2, "decode_workers": 1, "torch_threads": 1}
    worker = create_app(gw_settings(tiny_bundle_dir, **common, engine_subprocess=False, expose_engine_api=True,
                                    api_keys=[key]))
    async with running_server(worker) as worker_url:
        gateway = create_app(gw_settings(tiny_bundle_dir, **common, engine_urls=[worker_url], engine_api_key=key,
                                         redis_url=REDIS_URL, redis_namespace=redis_namespace))
        async with running_server(gateway) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
            load = Load(client)
            tasks = load.run()
            try:
                await eventually(lambda: sum(load.versions.values()), until=lambda n: n >= 5)
                reg.activate(v2)
                assert await eventually(lambda: _served_version(client), until=lambda v: v == v2,
                                        timeout_s=60) == v2
                await eventually(lambda: load.versions[v2], until=lambda n: n >= 5)
                reg.activate(v1)
                assert await eventually(lambda: _served_version(client), until=lambda v: v == v1,
                                        timeout_s=60) == v1
                await eventually(lambda: load.versions[v1], until=lambda n: n >= 10)
            finally:
                load.stop.set()
                await asyncio.gather(*tasks)
            assert not load.failures, load.failures[:5]
            other = await client.post(f"{worker_url}/internal/engine/topk", headers={"Authorization": f"Bearer {key}"},
                                      json={"request_id": "x", "prompt": "p", "k": 1, "model_version": "not-served"})
            assert other.status_code == 409 and other.json()["code"] == "version_not_served"
