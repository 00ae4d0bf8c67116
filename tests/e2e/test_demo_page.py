"""The /demo page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python
package; no browser is downloaded): a real uvicorn gateway on a free loopback port with the tiny
bundle (or GREAM_E2E_BUNDLE), demo_page on and an API key configured.

The test types the API key, searches the catalog, adds the first hit to the history, asks for k
items and presses Recommend; it then waits for streamed reasoning text and for k item cards, and
asserts from a MutationObserver of its own that reasoning text appeared (and grew) before the
first card did, that the page shows time to first token and total latency, and that no error is
shown. It saves a screenshot (var/demo-page.png, or GREAM_E2E_SCREENSHOT; the docs'
docs/demo-page.png is made with GREAM_E2E_SCREENSHOT=docs/demo-page.png GREAM_E2E_BUNDLE=var/demo-bundle) and prints the browser's
time to first token. It also checks that an in-band `event: error` is shown to the person, and
that the GET stream works with the browser's own EventSource and the `api_key` query parameter.

Skips, with the reason, only when no Chromium binary is installed (or Playwright is missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from loadtests.harness import wait_ready

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "e2e-demo-key-0001"
K = 5
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records, in page time, every change of the reasoning text and of the number of item cards.
OBSERVER_JS = """() => {
  const reasoning = document.getElementById('reasoning');
  const items = document.getElementById('items');
  const log = window.__e2e = [];
  const record = () => {
    const text = reasoning.textContent;
    const cards = items.querySelectorAll('.card').length;
    const last = log[log.length - 1];
    if (!last || last.text !== text.length || last.cards !== cards) {
      log.push({t: performance.now(), text: text.length, cards,
                streaming: reasoning.classList.contains('streaming')});
    }
  };
  new MutationObserver(record).observe(reasoning, {childList: true, characterData: true, subtree: true});
  new MutationObserver(record).observe(items, {childList: true, subtree: true});
}"""

EVENTSOURCE_JS = """(url) => new Promise((resolve) => {
  const es = new EventSource(url);
  const seen = [];
  const timer = setTimeout(() => { es.close(); resolve(seen.concat([['timeout', null]])); }, 60000);
  for (const kind of ['reasoning', 'items', 'done']) {
    es.addEventListener(kind, (e) => {
      seen.push([kind, JSON.parse(e.data)]);
      if (kind === 'done') { clearTimeout(timer); es.close(); resolve(seen); }
    });
  }
  es.addEventListener('error', (e) => { clearTimeout(timer); es.close(); resolve(seen.concat([['error', e.data || null]])); });
})"""


def find_chromium() -> str | None:
    explicit = os.environ.get("GREAM_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                                                      "(pip install playwright; no browser download needed)")
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found: install Debian's package (apt-get install -y chromium) "
                    "or point GREAM_CHROMIUM at a Chromium binary")
    return path


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_dir: Path) -> Path:
    explicit = os.environ.get("GREAM_E2E_BUNDLE")
    return Path(explicit) if explicit else tiny_bundle_dir


@contextmanager
def running_gateway(bundle_dir: Path, **overrides: Any) -> Iterator[str]:
    """A real uvicorn gateway (demo page on, API key set, in-memory histories) in a thread, on a loopback
    socket bound here (no port race); yields its base URL once /readyz answers 200."""
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    fields: dict[str, Any] = {"bundle": bundle_dir, "demo_page": True, "api_keys": [API_KEY], "redis_url": None,
                              "log_json": False, "engine": "transformers", "engine_urls": []}
    app = create_app(Settings(**{**fields, **overrides}))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="e2e-gateway", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, alive=thread.is_alive, timeout_s=180, interval_s=0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def gateway(bundle_dir: Path) -> Iterator[str]:
    with running_gateway(bundle_dir) as base:
        yield base


def search_word(bundle_dir: Path) -> str:
    """A title word of the catalog's first item that is at least 3 letters long ("pipette" in the tiny bundle)."""
    with open(bundle_dir / "items.jsonl", encoding="utf-8") as f:
        title = json.loads(f.readline())["title"]
    words = [w for w in re.findall(r"[^\W\d_]+", title) if len(w) >= 3]
    return max(words, key=len) if words else title.split()[0]


def test_demo_page_streams_reasoning_then_items(chromium: str, gateway: str, bundle_dir: Path,
                                                tmp_path: Path, record_property: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # the default 5 s is short on a busy 2-core CI machine
    screenshot = Path(os.environ.get("GREAM_E2E_SCREENSHOT", ROOT / "var" / "demo-page.png"))
    problems: list[str] = []
    with sync_playwright() as pw:
        # Playwright gives every launch a fresh temporary profile (user data dir).
        browser = pw.chromium.launch(executable_path=chromium, headless=True, chromium_sandbox=False,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860}, color_scheme="light")
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error" else None)
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            outside: list[str] = []
            page.on("request", lambda req: outside.append(req.url) if not req.url.startswith(gateway) else None)

            page.goto(f"{gateway}/demo")
            expect(page).to_have_title("GREAM Serve demo")
            expect(page.locator("#model-info")).to_contain_text("Model ")

            # The API key goes into its field; the page sends it as a bearer header.
            page.get_by_label("API key").fill(API_KEY)
            word = search_word(bundle_dir)
            page.get_by_label("Search the catalog by title").fill(word)
            hits = page.locator("#search-results li")
            expect(hits.first).to_be_visible()
            expect(hits.first).to_contain_text(re.compile(word, re.IGNORECASE))
            first_title = hits.first.locator(".item-text").inner_text()
            page.get_by_role("button", name=re.compile(r"^Add ")).first.click()
            expect(page.locator("#history-list li")).to_have_count(1)
            expect(page.locator("#history-count")).to_have_text("1")
            assert first_title.split("\n")[0] in page.locator("#history-list").inner_text()

            page.get_by_label("Items (k)").fill(str(K))
            page.get_by_label("Reasoning budget (tokens)").fill("64")
            page.evaluate(OBSERVER_JS)
            page.get_by_role("button", name="Recommend").click()

            page.wait_for_function("() => document.getElementById('reasoning').textContent.length > 0")
            cards = page.locator("#items .card")
            expect(cards).to_have_count(K, timeout=60_000)
            expect(page.locator("#status")).to_have_text("done")
            expect(page.get_by_role("alert")).to_be_hidden()
            expect(page.locator("#reasoning-tokens")).to_have_text(re.compile(r"^\d+$"))

            log = page.evaluate("window.__e2e")
            first_text = next(i for i, e in enumerate(log) if e["text"] > 0)
            first_card = next(i for i, e in enumerate(log) if e["cards"] > 0)
            assert first_text < first_card, log
            assert log[first_text]["cards"] == 0 and log[first_text]["streaming"], log
            assert log[first_card]["text"] > 0 and log[first_card]["t"] >= log[first_text]["t"], log
            # The text arrived in pieces while it was generated, not in one block with the items.
            reasoning_tokens = int(page.locator("#reasoning-tokens").inner_text())
            growth = {e["text"] for e in log[:first_card] if e["text"] > 0}
            assert len(growth) >= 2 or reasoning_tokens < 4, log
            assert log[-1]["cards"] == K

            # Every card shows a title, a semantic ID and a score.
            for i in range(K):
                card = cards.nth(i)
                assert card.locator(".title").inner_text().strip()
                assert re.fullmatch(r"(<[a-z]_\d+>)+", card.locator(".semantic-id").inner_text().strip())
                assert re.fullmatch(r"-?\d+\.\d{3}", card.locator(".score").inner_text().strip())
            stats = page.locator("#stats")
            ttft_ms = float(stats.get_attribute("data-ttft-ms") or "nan")
            latency_ms = float(stats.get_attribute("data-latency-ms") or "nan")
            assert 0 < ttft_ms <= latency_ms, (ttft_ms, latency_ms)
            expect(page.locator("#ttft")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))
            expect(page.locator("#latency")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))

            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            record_property("browser_ttft_ms", ttft_ms)
            record_property("browser_latency_ms", latency_ms)
            print(f"\nbrowser TTFT {ttft_ms:.1f} ms, total latency {latency_ms:.1f} ms "
                  f"(bundle {bundle_dir}, k={K}, 64 reasoning tokens max; screenshot {screenshot})")

            # EventSource: GET stream, key as a query parameter (it cannot set headers).
            history = page.evaluate("Array.from(document.querySelectorAll('#history-list .item-id'))"
                                    ".map((n) => n.textContent)")
            query = urlencode([("history", h) for h in history] + [("k", 3), ("max_reasoning_tokens", 8),
                                                                      ("api_key", API_KEY)])
            url = f"v1/recommendations/stream?{query}"
            events = page.evaluate(EVENTSOURCE_JS, url)
            kinds = [kind for kind, _ in events]
            n = kinds.count("reasoning")
            assert n >= 1 and kinds == ["reasoning"] * n + ["items", "done"], events
            assert len(events[-2][1]["items"]) == 3
            assert not problems, problems
            assert not outside, f"the page requested other origins: {outside}"

            # An in-band `event: error` (a failure after the stream started) is shown to the person.
            page.route("**/v1/recommendations/stream", lambda route: route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"},
                body='event: reasoning\ndata: {"delta":"thinking"}\n\n'
                     'event: error\ndata: {"code":"engine_unavailable","message":"the engine went away"}\n\n'))
            page.get_by_role("button", name="Recommend").click()
            alert = page.get_by_role("alert")
            expect(alert).to_be_visible()
            expect(alert).to_contain_text("engine_unavailable: the engine went away")
            expect(page.locator("#status")).to_have_text("failed")
            expect(page.locator("#items .card")).to_have_count(0)
            page.unroute("**/v1/recommendations/stream")

            # A refused request (no key) is shown too, with the server's message.
            page.get_by_label("API key").fill("")
            page.get_by_role("button", name="Recommend").click()
            expect(alert).to_contain_text("HTTP 401")
        finally:
            browser.close()
