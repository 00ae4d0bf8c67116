"""GET /v1/recommendations/stream, the EventSource twin of the POST stream: the same events from query
parameters (history repeated or comma-separated), 422s naming the query field, and the API key as a
query parameter on this route only, never written to the logs."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

HISTORY = ["sku-3", "sku-14", "sku-15", "sku-92"]
STREAM = "/v1/recommendations/stream"


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def without_timing(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(kind, {k: v for k, v in data.items() if k not in ("latency_ms", "request_id")}) for kind, data in events]


async def test_get_stream_sends_the_same_events_as_post(make_client: Any) -> None:
    async with make_client() as client:
        post = await client.post(STREAM, json={"history": HISTORY, "k": 4, "max_reasoning_tokens": 12})
        repeated = await client.get(STREAM, params=[("history", h) for h in HISTORY] + [
            ("k", "4"), ("max_reasoning_tokens", "12")], headers={"X-Request-Id": "get-stream-1"})
        commas = await client.get(STREAM, params={"history": ",".join(HISTORY), "k": 4, "max_reasoning_tokens": 12})
        assert repeated.status_code == commas.status_code == 200, repeated.text
        assert repeated.headers["content-type"].startswith("text/event-stream")
        assert repeated.headers["cache-control"] == "no-cache"
        events = parse_sse(repeated.text)
        kinds = [kind for kind, _ in events]
        n = kinds.count("reasoning")
        assert n >= 1 and kinds == ["reasoning"] * n + ["items", "done"]
        assert events[-1][1]["request_id"] == "get-stream-1"
        items = [i["item_id"] for i in events[-2][1]["items"]]
        assert len(items) == 4 == len(set(items)) and not set(items) & set(HISTORY)
        # Greedy reasoning and deterministic beams: the three forms give the same answer.
        assert without_timing(events) == without_timing(parse_sse(commas.text)) == without_timing(
            parse_sse(post.text))


async def test_get_stream_options_and_fallback(make_client: Any) -> None:
    async with make_client() as client:
        body = {"history": ["sku-3", "sku-14"], "k": 30, "exclude_seen": False, "max_reasoning_tokens": 2}
        post = parse_sse((await client.post(STREAM, json=body)).text)
        get = parse_sse((await client.get(STREAM, params={"history": "sku-3,sku-14", "k": 30,
                                                          "exclude_seen": "false",
                                                          "max_reasoning_tokens": 2})).text)
        assert len(get[-2][1]["items"]) == 30 and without_timing(get) == without_timing(post)
        excluded = parse_sse((await client.get(STREAM, params={"history": "sku-3,sku-14", "k": 30,
                                                               "max_reasoning_tokens": 2})).text)
        assert not {"sku-3", "sku-14"} & {i["item_id"] for i in excluded[-2][1]["items"]}
        for params in ({}, {"history": ""}, {"user_id": "nobody-get-stream"}):
            fallback = parse_sse((await client.get(STREAM, params={**params, "k": 3})).text)
            assert [kind for kind, _ in fallback] == ["items", "done"], params
            assert all(i["fallback"] == "popular" for i in fallback[0][1]["items"])


async def test_get_stream_errors_name_the_query_field(make_client: Any) -> None:
    async with make_client(max_reasoning_tokens=64, max_k=20) as client:
        cases = [({"k": 0}, "query.k"), ({"k": "many"}, "query.k"), ({"k": 21}, "query.k"),
                 ({"max_reasoning_tokens": 65}, "query.max_reasoning_tokens"),
                 ({"max_reasoning_tokens": 0}, "query.max_reasoning_tokens"),
                 ({"exclude_seen": "perhaps"}, "query.exclude_seen"),
                 ({"user_id": "has space"}, "query.user_id"),
                 ({"history": "x" * 300}, "query.history")]
        for params, field in cases:
            resp = await client.get(STREAM, params={"history": "sku-1", **params})
            assert resp.status_code == 422 and resp.headers["content-type"] == "application/json", (params, resp.text)
            body = resp.json()
            assert body["code"] == "invalid_request" and field in [e["field"] for e in body["errors"]], body
        unknown = await client.get(STREAM, params={"history": "sku-1,zzz"})
        assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_items"
        assert unknown.json()["errors"][0]["item_ids"] == ["zzz"]


async def test_api_key_as_query_parameter_on_this_route_only_and_never_logged(
        make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    key = "eventsource-secret-4711"
    params = {"history": "sku-3,sku-14", "k": 2, "max_reasoning_tokens": 2}
    caplog.set_level(logging.DEBUG)
    async with make_client(api_keys=[key]) as client:
        assert (await client.get(STREAM, params=params)).status_code == 401
        assert (await client.get(STREAM, params={**params, "api_key": "wrong-key-000"})).status_code == 401
        by_query = await client.get(STREAM, params={**params, "api_key": key})
        assert by_query.status_code == 200 and parse_sse(by_query.text)[-1][0] == "done"
        by_header = await client.get(STREAM, params=params, headers={"Authorization": f"Bearer {key}"})
        assert by_header.status_code == 200
        # Header-only everywhere else, the POST stream included.
        post = await client.post(f"{STREAM}?api_key={key}", json={"history": ["sku-3"], "k": 2})
        assert post.status_code == 401
        assert (await client.get(f"/v1/items/sku-1?api_key={key}")).status_code == 401
        assert "api_key" in json.dumps((await client.get("/openapi.json")).json()["paths"][STREAM]["get"])
    access = [r for r in caplog.records if r.name == "gream.access" and r.__dict__.get("route") == STREAM]
    assert len(access) >= 4 and all(r.__dict__["path"] == STREAM for r in access)
    # Only the server's own records: the test's HTTP client (httpx) logs the URLs it requests.
    for record in (r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))):
        assert key not in record.getMessage()
        assert key not in json.dumps({k: str(v) for k, v in record.__dict__.items()}), record
