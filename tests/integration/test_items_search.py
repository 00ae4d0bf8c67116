"""GET /v1/items?q=: title search over the tiny bundle (titles like "Acme pipette model 0"), its
ranking, its item schema (the one of GET /v1/items/{item_id}), parameter errors, auth, and the
demo page's mounting (off by default)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

KINDS = ["pipette", "beaker", "glove", "scale", "funnel", "clamp", "tape", "sensor"]
BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Stark"]


def by_popularity(bundle: Any, indices: list[int]) -> list[str]:
    return [f"sku-{i}" for i in sorted(indices, key=lambda i: (-float(bundle.popularity[i]), i))]


def assert_invalid(resp: httpx.Response, field: str) -> None:
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "invalid_request"
    assert field in [e["field"] for e in body["errors"]], body
    assert body["request_id"] == resp.headers["x-request-id"]


async def test_search_matches_every_word_ranked_by_popularity(make_client: Any, gw_bundle: Any) -> None:
    async with make_client() as client:
        resp = await client.get("/v1/items", params={"q": "pipette", "limit": 50})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pipettes = [i for i in range(300) if i % 8 == 0]
        assert body["query"] == "pipette" and body["total"] == len(pipettes)
        # Every match has the word at the same position, so popularity decides.
        assert [it["item_id"] for it in body["items"]] == by_popularity(gw_bundle, pipettes)

        both = (await client.get("/v1/items", params={"q": "ACME  Pipette"})).json()
        expected = by_popularity(gw_bundle, [i for i in range(300) if i % 40 == 0])
        assert [it["item_id"] for it in both["items"]] == expected and both["total"] == len(expected)

        # Prefixes match while someone types; the default limit is 10.
        prefix = (await client.get("/v1/items", params={"q": "acme pip"})).json()
        assert [it["item_id"] for it in prefix["items"]] == expected

        # A whole-word match ranks before prefix matches ("12" before "120".."129").
        model12 = (await client.get("/v1/items", params={"q": "model 12", "limit": 50})).json()
        got = [it["item_id"] for it in model12["items"]]
        assert got[0] == "sku-12" and sorted(got[1:]) == sorted(f"sku-{n}" for n in range(120, 130))

        none = await client.get("/v1/items", params={"q": "acme nosuchword"})
        assert none.status_code == 200 and none.json() == {"query": "acme nosuchword", "total": 0, "items": []}


async def test_search_items_have_the_item_schema(make_client: Any) -> None:
    async with make_client() as client:
        found = (await client.get("/v1/items", params={"q": "stark sensor", "limit": 3})).json()
        assert len(found["items"]) == 3
        for item in found["items"]:
            assert item == (await client.get(f"/v1/items/{item['item_id']}")).json()
        assert found["total"] > 3  # the response holds at most `limit`
        assert "/v1/items" in (await client.get("/openapi.json")).json()["paths"]


async def test_search_parameter_errors_name_the_field(make_client: Any) -> None:
    async with make_client() as client:
        assert_invalid(await client.get("/v1/items"), "query.q")
        assert_invalid(await client.get("/v1/items", params={"q": ""}), "query.q")
        # No word at all is no error (the schema states no such rule): it matches nothing.
        wordless = await client.get("/v1/items", params={"q": " ?! ("})
        assert wordless.status_code == 200 and wordless.json() == {"query": " ?! (", "total": 0, "items": []}
        assert_invalid(await client.get("/v1/items", params={"q": "x" * 201}), "query.q")
        assert_invalid(await client.get("/v1/items", params={"q": "acme", "limit": 0}), "query.limit")
        assert_invalid(await client.get("/v1/items", params={"q": "acme", "limit": 51}), "query.limit")
        assert_invalid(await client.get("/v1/items", params={"q": "acme", "limit": "ten"}), "query.limit")
        ok = await client.get("/v1/items", params={"q": "acme", "limit": 50})
        assert ok.status_code == 200 and len(ok.json()["items"]) == 50


async def test_search_needs_the_api_key_header(make_client: Any) -> None:
    key = "search-key-123"
    async with make_client(api_keys=[key]) as client:
        assert (await client.get("/v1/items", params={"q": "acme"})).status_code == 401
        # The query-parameter key is for the EventSource stream route only.
        assert (await client.get("/v1/items", params={"q": "acme", "api_key": key})).status_code == 401
        ok = await client.get("/v1/items", params={"q": "acme"}, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["total"] == 60


async def test_demo_page_is_off_by_default_and_served_when_enabled(make_client: Any) -> None:
    async with make_client() as client:
        assert (await client.get("/demo")).status_code == 404
        assert (await client.get("/demo/assets/demo.js")).status_code == 404
    async with make_client(demo_page=True, api_keys=["demo-key-123"]) as client:
        page = await client.get("/demo")  # the page itself is open; its API calls carry the key
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        assert 'href="demo/assets/demo.css"' in html and 'src="demo/assets/demo.js"' in html
        assert "http://" not in html and "https://" not in html  # no CDNs, no external fonts
        for asset, kind in (("demo.css", "text/css"), ("demo.js", "javascript")):
            resp = await client.get(f"/demo/assets/{asset}")
            assert resp.status_code == 200 and kind in resp.headers["content-type"]
            assert "http://" not in resp.text and "https://" not in resp.text
        assert "/demo" not in (await client.get("/openapi.json")).json()["paths"]
