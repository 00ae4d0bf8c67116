"""Time to first reasoning token as the demo page sees it, in headless Chromium.

    .venv/bin/python -m tests.e2e.browser_ttft --bundle var/demo-bundle --runs 10

Starts the gateway in-process (transformers engine, as `make run`), opens /demo, builds a history
of `--history` items from a title search, and presses Recommend `--runs` times (after one
unmeasured warm-up press). The page measures from the click (just before fetch) to the first
streamed reasoning delta rendered, and to the `done` event (total latency); this prints the median,
min and max of both, as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tests.e2e.test_demo_page import API_KEY, CHROMIUM_ARGS, find_chromium, running_gateway, search_word


def measure(bundle: Path, runs: int, history: int, k: int, budget: int, chromium: str) -> dict[str, object]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)

    with running_gateway(bundle) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, chromium_sandbox=False,
                                     args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(120_000)
        page.goto(f"{base}/demo")
        page.get_by_label("API key").fill(API_KEY)
        page.get_by_label("Search the catalog by title").fill(search_word(bundle))
        hits = page.locator("#search-results li")
        expect(hits.first).to_be_visible()
        for i in range(min(history, hits.count())):
            hits.nth(i).get_by_role("button").click()
        page.get_by_label("Items (k)").fill(str(k))
        page.get_by_label("Reasoning budget (tokens)").fill(str(budget))
        ttft, total, tokens = [], [], []
        for run in range(runs + 1):
            page.get_by_role("button", name="Recommend").click()
            expect(page.locator("#status")).to_have_text("done")
            if page.get_by_role("alert").is_visible():
                raise RuntimeError(page.get_by_role("alert").inner_text())
            if run == 0:
                continue  # warm-up
            stats = page.locator("#stats")
            ttft.append(float(stats.get_attribute("data-ttft-ms") or "nan"))
            total.append(float(stats.get_attribute("data-latency-ms") or "nan"))
            tokens.append(int(page.locator("#reasoning-tokens").inner_text()))
        version = browser.version
        browser.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                "max": round(max(values), 1)}

    return {"bundle": str(bundle), "runs": runs, "history_items": history, "k": k, "max_reasoning_tokens": budget,
            "ttft_ms": summary(ttft), "total_latency_ms": summary(total), "reasoning_tokens": summary(tokens),
            "chromium": version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--history", type=int, default=3, help="items added to the history from the search")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--budget", type=int, default=64, help="max reasoning tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found (apt-get install -y chromium, or set GREAM_CHROMIUM)", file=sys.stderr)
        return 2
    result = measure(args.bundle, args.runs, args.history, args.k, args.budget, chromium)
    if args.json:
        print(json.dumps(result))
    else:
        t, lat = result["ttft_ms"], result["total_latency_ms"]
        print(f"{args.bundle}: browser TTFT median {t['median']} ms (min {t['min']}, max {t['max']}); "  # type: ignore[index]
              f"total latency median {lat['median']} ms (min {lat['min']}, max {lat['max']}); "  # type: ignore[index]
              f"{args.runs} runs, history {args.history} items, k={args.k}, budget {args.budget} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
