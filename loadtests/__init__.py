"""Load tools: the engine benchmark, the reliability runs, the trie benchmark and the locust scenarios.

`loadtests.harness` holds what they and the tests share: free ports, gateway processes, readiness and
Prometheus scraping.
"""
