"""Test-only helpers: tiny bundles (bundles), the test Redis (redis_db), polling (waiting). Ports,
gateway processes, readiness and metrics come from loadtests.harness, which the load tools share."""
