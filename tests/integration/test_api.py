"""Contract tests of the /v1 API and the operational endpoints, with the real TransformersEngine on the
tiny bundle and the real Redis (db 15)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtests.harness import parse_metrics

pytestmark = pytest.mark.asyncio(loop_scope="session")

N_ITEMS = 300  # the tiny bundle's catalog: sku-0 .. sku-299
ITEM_RE = re.compile(r"^(<[a-j]_\d+>){4}$")


def ids(*numbers: int) -> list[str]:
    return [f"sku-{n}" for n in numbers]


def item_ids(body: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in body["items"]]


def assert_error(resp: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code
    assert body["message"]
    assert body["request_id"] == resp.headers["x-request-id"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
        assert field in body["message"]
    return body


# ------------------------------------------------------------------ operational endpoints
async def test_health_ready_metrics_docs(make_client: Any) -> None:
    async with make_client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready" and body["engine_ready"] and body["bundle_loaded"]
        assert body["history_store"] == "redis" and body["history_store_state"] == "up"
        import gc

        assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's reach (freeze_heap)
        await client.post("/v1/recommendations", json={"history": ids(1, 2), "k": 3})
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'gream_http_requests_total{method="POST",route="/v1/recommendations",status="200"} 1.0' in text
        for name in ("gream_http_request_duration_seconds_bucket", "gream_engine_queue_depth",
                     "gream_engine_batch_size_bucket", "gream_items_returned_bucket", "gream_build_info"):
            assert name in text
        assert parse_metrics(text)["gream_engine_busy_seconds_total"] > 0  # the request's batch was timed
        docs = await client.get("/openapi.json")
        paths = docs.json()["paths"]
        for path in ("/v1/recommendations", "/v1/recommendations/stream", "/v1/users/{user_id}/events",
                     "/v1/users/{user_id}/history", "/v1/items/{item_id}", "/healthz", "/readyz", "/metrics"):
            assert path in paths
        assert not any(p.startswith("/internal") for p in paths)


async def test_openapi_documents_what_the_routes_answer(make_client: Any) -> None:
    """The details a fuzzer found missing; test_openapi_conformance checks the whole document."""
    async with make_client() as client:
        doc = (await client.get("/openapi.json")).json()
        paths, components = doc["paths"], doc["components"]["schemas"]
        assert {"400", "413", "422", "429", "503"} <= set(paths["/v1/recommendations"]["post"]["responses"])
        assert "404" in paths["/v1/items/{item_id}"]["get"]["responses"]
        # The stream's 200 is text/event-stream, one schema per event, its data a component; errors stay JSON.
        for method in ("get", "post"):
            responses = paths["/v1/recommendations/stream"][method]["responses"]
            assert set(responses["200"]["content"]) == {"text/event-stream"}
            events = responses["200"]["content"]["text/event-stream"]["itemSchema"]["oneOf"]
            assert [e["properties"]["event"]["const"] for e in events] == ["reasoning", "items", "done", "error"]
            refs = [e["properties"]["data"]["contentSchema"]["$ref"].rsplit("/", 1)[1] for e in events]
            assert refs == ["ReasoningEvent", "ItemsEvent", "DoneEvent", "ErrorEvent"]
            assert all(name in components for name in refs)
            assert set(responses["422"]["content"]) == {"application/json"}
        # GET and DELETE of a history are two routes; a 405 names both.
        options = await client.options("/v1/users/u-1/history")
        assert options.status_code == 405 and options.headers["allow"] == "DELETE, GET"
        assert (await client.put("/v1/recommendations/stream")).headers["allow"] == "GET, POST"


# ------------------------------------------------------------------ recommendations
async def test_recommend_from_request_history(make_client: Any, gw_bundle: Any) -> None:
    async with make_client() as client:
        history = ids(3, 14, 15, 92)
        resp = await client.post("/v1/recommendations", json={"history": history, "k": 10},
                                 headers={"X-Request-Id": "req-abc.1"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == "req-abc.1"
        body = resp.json()
        assert body["request_id"] == "req-abc.1"
        assert body["model_version"] == gw_bundle.version
        assert body["history_used"] == 4 and body["history_source"] == "request" and body["fallback"] is None
        got = item_ids(body)
        assert len(got) == 10 == len(set(got))
        assert not set(got) & set(history)  # exclude_seen defaults to true
        scores = [item["score"] for item in body["items"]]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
        for item in body["items"]:
            index = gw_bundle.index_of[item["item_id"]]
            assert item["title"] == gw_bundle.items[index].title
            assert item["semantic_id"] == gw_bundle.spelled_id(index) and ITEM_RE.match(item["semantic_id"])


async def test_collaborative_prior_is_fused_unless_switched_off(make_client: Any) -> None:
    """The tiny bundle's prior says sku-(i+1) follows sku-i: fused (the default) it leads the list;
    with use_prior off the model decides alone."""
    body = {"history": ids(60, 61), "k": 10}
    async with make_client() as client:
        fused = item_ids((await client.post("/v1/recommendations", json=body)).json())
    async with make_client(use_prior=False) as client:
        plain = item_ids((await client.post("/v1/recommendations", json=body)).json())
    assert fused[0] == "sku-62"
    assert fused != plain


async def test_request_id_generated_when_missing_or_unsafe(make_client: Any) -> None:
    async with make_client() as client:
        plain = await client.post("/v1/recommendations", json={"history": ids(1), "k": 1})
        assert re.fullmatch(r"[0-9a-f]{32}", plain.headers["x-request-id"])
        assert plain.json()["request_id"] == plain.headers["x-request-id"]
        unsafe = await client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
        assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


async def test_exclusions_and_allow_lists_are_enforced_inside_decoding(make_client: Any) -> None:
    async with make_client() as client:
        history = ids(5, 6, 7)
        first = item_ids((await client.post("/v1/recommendations", json={"history": history, "k": 10})).json())
        # Excluding the whole first page still yields 10 valid items (the trie skips them).
        second = (await client.post("/v1/recommendations",
                                    json={"history": history, "k": 10, "exclude_items": first})).json()
        assert len(item_ids(second)) == 10 and not set(item_ids(second)) & set(first + history)
        allow = ids(1, 2, 3, 5, 200, 201)
        only = (await client.post("/v1/recommendations",
                                  json={"history": history, "k": 10, "allow_items": allow})).json()
        # Five allowed items remain once the history (sku-5) is excluded: all of them, nothing else.
        assert sorted(item_ids(only)) == sorted(set(allow) - {"sku-5"})
        seen_ok = await client.post("/v1/recommendations",
                                    json={"history": history, "k": 3, "exclude_seen": False,
                                          "allow_items": history})
        assert sorted(item_ids(seen_ok.json())) == sorted(history)
        nothing = await client.post("/v1/recommendations",
                                    json={"history": history, "k": 3, "allow_items": ids(5)})
        assert nothing.status_code == 200 and nothing.json()["items"] == []


async def test_no_history_gets_popular_fallback(make_client: Any, gw_bundle: Any) -> None:
    async with make_client() as client:
        body = (await client.post("/v1/recommendations", json={"k": 5})).json()
        assert body["fallback"] == "popular" and body["history_source"] == "none"
        assert item_ids(body) == [gw_bundle.items[i].item_id for i in gw_bundle.popular(5)]
        assert all(item["fallback"] == "popular" and item["score"] is None for item in body["items"])
        top = item_ids(body)[0]
        excluded = (await client.post("/v1/recommendations", json={"k": 5, "exclude_items": [top]})).json()
        assert top not in item_ids(excluded) and len(item_ids(excluded)) == 5
        fresh = (await client.post("/v1/recommendations", json={"user_id": "nobody-yet", "k": 2})).json()
        assert fresh["fallback"] == "popular" and len(fresh["items"]) == 2


async def test_unknown_item_ids_are_named(make_client: Any) -> None:
    async with make_client() as client:
        resp = await client.post("/v1/recommendations", json={
            "history": ["sku-1", "nope-1"], "exclude_items": ["nope-2"], "allow_items": ["sku-2", "nope-3"]})
        body = assert_error(resp, 422, "unknown_items")
        named = {e["field"]: e["item_ids"] for e in body["errors"]}
        assert named == {"history": ["nope-1"], "exclude_items": ["nope-2"], "allow_items": ["nope-3"]}
        assert "nope-1" in body["message"]


@pytest.mark.parametrize(("payload", "field"), [
    ({"k": 0}, "k"),
    ({"k": 101}, "k"),
    ({"k": "ten"}, "k"),
    ({"k": "5"}, "k"),  # strict: a number in a string is a client bug
    ({"k": 5.0}, "k"),
    ({"exclude_seen": 0}, "exclude_seen"),
    ({"exclude_seen": "false"}, "exclude_seen"),
    ({"history": [f"sku-{i % 300}" for i in range(201)]}, "history"),
    ({"history": "sku-1"}, "history"),
    ({"exclude_item": ["sku-1"]}, "exclude_item"),
    ({"user_id": "has space"}, "user_id"),
    ({"history": [""]}, "history.0"),
])
async def test_invalid_requests_name_the_field(make_client: Any, payload: dict[str, Any], field: str) -> None:
    async with make_client() as client:
        assert_error(await client.post("/v1/recommendations", json=payload), 422, "invalid_request", field)


async def test_malformed_json_and_body_limit(make_client: Any) -> None:
    async with make_client(max_body_bytes=2048) as client:
        bad = await client.post("/v1/recommendations", content=b"{not json",
                                headers={"content-type": "application/json"})
        assert_error(bad, 400, "invalid_json", "body")
        big = await client.post("/v1/recommendations", json={"history": ["sku-1"] * 400})
        assert_error(big, 413, "payload_too_large", "body")

        async def chunks() -> Any:  # no Content-Length: the limit still holds while streaming in
            for _ in range(10):
                yield b" " * 500

        streamed = await client.post("/v1/recommendations", content=chunks(),
                                     headers={"content-type": "application/json"})
        assert_error(streamed, 413, "payload_too_large")


# ------------------------------------------------------------------ users and items
async def test_events_history_and_cached_recommendations(make_client: Any) -> None:
    async with make_client(history_cap=6, history_drop_chunk=3) as client:
        resp = await client.post("/v1/users/u-1/events", json={"events": [
            {"item_id": "sku-10", "timestamp": 30}, {"item_id": "sku-11", "timestamp": 10},
            {"item_id": "sku-12", "timestamp": 20}]})
        assert resp.status_code == 202 and resp.json() == {"user_id": "u-1", "accepted": 3, "history_length": 3}
        history = (await client.get("/v1/users/u-1/history")).json()
        assert history == {"user_id": "u-1", "items": ids(11, 12, 10), "history_length": 3}

        rec = (await client.post("/v1/recommendations", json={"user_id": "u-1", "k": 10})).json()
        assert rec["history_source"] == "cache" and rec["history_used"] == 3 and rec["user_id"] == "u-1"
        assert not set(item_ids(rec)) & set(ids(10, 11, 12))
        # A history in the body overrides the cache.
        own = (await client.post("/v1/recommendations", json={"user_id": "u-1", "history": ids(1), "k": 2})).json()
        assert own["history_source"] == "request" and own["history_used"] == 1

        # Capped at 6, trimmed in chunks of 3.
        more = await client.post("/v1/users/u-1/events",
                                 json={"events": [{"item_id": i} for i in ids(20, 21, 22, 23)]})
        assert more.json()["history_length"] == 4
        assert (await client.get("/v1/users/u-1/history")).json()["items"] == ids(20, 21, 22, 23)

        assert (await client.delete("/v1/users/u-1/history")).status_code == 204
        assert (await client.get("/v1/users/u-1/history")).json()["items"] == []
        fallback = (await client.post("/v1/recommendations", json={"user_id": "u-1", "k": 3})).json()
        assert fallback["fallback"] == "popular"


async def test_event_errors(make_client: Any) -> None:
    async with make_client(max_history=5) as client:
        unknown = await client.post("/v1/users/u-2/events",
                                    json={"events": [{"item_id": "sku-1"}, {"item_id": "ghost"}]})
        body = assert_error(unknown, 422, "unknown_items", "events")
        assert body["errors"][0]["item_ids"] == ["ghost"]
        # Nothing of a rejected batch is written.
        assert (await client.get("/v1/users/u-2/history")).json()["items"] == []
        too_many = await client.post("/v1/users/u-2/events",
                                     json={"events": [{"item_id": "sku-1"}] * 6})
        assert_error(too_many, 422, "invalid_request", "events")
        empty = await client.post("/v1/users/u-2/events", json={"events": []})
        assert_error(empty, 422, "invalid_request", "events")
        bad_user = await client.get("/v1/users/" + "x" * 129 + "/history")
        assert_error(bad_user, 422, "invalid_request", "path.user_id")


async def test_items_endpoint(make_client: Any, gw_bundle: Any) -> None:
    async with make_client() as client:
        body = (await client.get("/v1/items/sku-42")).json()
        index = gw_bundle.index_of["sku-42"]
        assert body["item_id"] == "sku-42" and body["title"] == gw_bundle.items[index].title
        assert body["semantic_id"] == gw_bundle.spelled_id(index)
        assert body["codes"] == [int(c) for c in gw_bundle.codes[index]]
        assert_error(await client.get("/v1/items/sku-9999"), 404, "item_not_found", "item_id")


# ------------------------------------------------------------------ auth
async def test_bearer_auth_when_keys_are_configured(make_client: Any) -> None:
    async with make_client(api_keys=["key-one-123", "key-two-456"]) as client:
        missing = await client.post("/v1/recommendations", json={"history": ids(1), "k": 1})
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.get("/v1/items/sku-1", headers={"Authorization": "Bearer key-one-124"})
        assert_error(wrong, 401, "unauthorized")
        basic = await client.get("/v1/items/sku-1", headers={"Authorization": "Basic key-one-123"})
        assert basic.status_code == 401
        for key in ("key-one-123", "key-two-456"):
            ok = await client.get("/v1/items/sku-1", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        events = await client.post("/v1/users/u/events", json={"events": [{"item_id": "sku-1"}]})
        assert events.status_code == 401
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(open_path)).status_code == 200


# ------------------------------------------------------------------ back-pressure
async def test_full_queue_answers_429_with_retry_after(make_client: Any, gw_bundle: Any) -> None:
    from service.engine.config import TransformersEngineConfig
    from service.engine.transformers_engine import TransformersEngine

    config = TransformersEngineConfig(queue_max=1, max_batch=1, batch_wait_ms=0, torch_threads=1)
    small = TransformersEngine(gw_bundle, config)
    await small.start()
    try:
        async with make_client(engine=small) as client:
            results = await asyncio.gather(*[
                client.post("/v1/recommendations", json={"history": ids(i), "k": 5}) for i in range(12)])
            codes = [r.status_code for r in results]
            assert 200 in codes and 429 in codes, codes
            rejected = next(r for r in results if r.status_code == 429)
            assert_error(rejected, 429, "overloaded")
            assert int(rejected.headers["retry-after"]) >= 1
            metrics = (await client.get("/metrics")).text
            assert 'gream_engine_rejected_total{reason="overloaded"}' in metrics
    finally:
        await small.close()


# ------------------------------------------------------------------ property: every item valid
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_returned_items_are_valid_distinct_and_respect_filters(make_client: Any, data: Any) -> None:
    history = data.draw(st.lists(st.integers(0, N_ITEMS - 1), max_size=25), label="history")
    k = data.draw(st.integers(1, 25), label="k")
    exclude = data.draw(st.lists(st.integers(0, N_ITEMS - 1), max_size=40), label="exclude")
    allow = data.draw(st.one_of(st.none(), st.lists(st.integers(0, N_ITEMS - 1), max_size=30)), label="allow")
    exclude_seen = data.draw(st.booleans(), label="exclude_seen")
    payload: dict[str, Any] = {"history": ids(*history), "k": k, "exclude_items": ids(*exclude),
                               "exclude_seen": exclude_seen}
    if allow is not None:
        payload["allow_items"] = ids(*allow)
    async with make_client() as client:
        resp = await client.post("/v1/recommendations", json=payload)
    assert resp.status_code == 200, resp.text
    got = item_ids(resp.json())
    banned = set(ids(*exclude)) | (set(ids(*history)) if exclude_seen else set())
    pool = set(ids(*allow)) if allow is not None else set(ids(*range(N_ITEMS)))
    available = pool - banned
    assert len(got) == len(set(got)) == min(k, len(available))
    assert set(got) <= available
