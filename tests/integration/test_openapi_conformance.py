"""The OpenAPI document tells the truth: schemathesis generates requests for every route from
/openapi.json (its examples, coverage and fuzzing phases: valid and invalid bodies, parameters and
methods; the streams included) and checks each answer against the document: no server error, a
documented status code, a documented content type, a body (each server-sent event of a stream)
that matches its schema, 4xx for invalid data, 405 with the right `Allow` for other methods. In
process (the ASGI app on the tiny bundle, no network), with a fixed seed so CI sees the same cases
every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.engine import Status, from_schema
from schemathesis.engine.events import EngineFinished, NonFatalError, ScenarioFinished
from schemathesis.python.asgi import shutdown_lifespans

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection", "unsupported_method",
          "allow_header_conformance"]

CONFIG: dict[str, Any] = {
    "seed": 19,
    "workers": 1,
    "generation": {"max-examples": 25, "deterministic": True, "database": "none"},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    "phases": {"stateful": {"enabled": False}},
}


def test_every_route_conforms_to_the_openapi_document(tiny_bundle_dir: Path) -> None:
    from service.app import create_app
    from service.config import Settings

    # Small limits keep valid streams short; the in-memory history store needs no Redis.
    settings = Settings(bundle=tiny_bundle_dir, log_json=False, log_level="warning", engine_subprocess=False,
                        decode_workers=1, torch_threads=1, max_k=20, max_reasoning_tokens=8, max_history=20)
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings), config=config)
    try:
        events = list(from_schema(schema).execute())
    finally:
        shutdown_lifespans()  # the app's lifespan, started once by schemathesis for all of its requests
    errors = [f"{e.label}: {e.value!r}" for e in events if isinstance(e, NonFatalError)]
    scenarios = [e for e in events if isinstance(e, ScenarioFinished)]
    failures = sorted({f"{s.recorder.label}: {check.name}: {check.failure_info.failure.title}: "
                       f"{check.failure_info.failure.message}"
                       for s in scenarios for checks in s.recorder.checks.values() for check in checks
                       if check.status == Status.FAILURE and check.failure_info is not None})
    failures += [f"{f.operation}: {f.title}: {f.message}" for f in next(
        e for e in events if isinstance(e, EngineFinished)).failures]
    cases = sum(len(s.recorder.cases) for s in scenarios)
    operations = {s.recorder.label for s in scenarios}
    assert not errors, "\n".join(errors)
    assert not failures, "\n\n".join(failures)
    assert len(operations) >= 11 and cases >= 300, (cases, sorted(operations))
