"""Serving settings (env prefix, list parsing, validation messages) and the JSON log format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, load_settings


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("GREAM_")]:
        monkeypatch.delenv(name)
    s = Settings(_env_file=None)
    assert s.bundle == Path("var/demo-bundle") and s.host == "127.0.0.1" and s.port == 8000
    assert s.engine == "transformers" and s.engine_urls == [] and s.redis_url is None
    assert (s.history_cap, s.history_ttl_days, s.history_drop_chunk) == (50, 30, 10)
    assert (s.max_k, s.max_history, s.max_body_bytes, s.max_reasoning_tokens) == (100, 200, 65536, 512)
    assert (s.default_beams, s.queue_max, s.max_batch, s.batch_wait_ms) == (10, 256, 32, 10.0)
    assert not s.auth_enabled and s.history_ttl_seconds == 30 * 86400


def test_environment_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREAM_PORT", "9001")
    monkeypatch.setenv("GREAM_API_KEYS", "first-key-1, second-key-2")
    monkeypatch.setenv("GREAM_ENGINE_URLS", '["http://w1:8001/", "http://w2:8001"]')
    monkeypatch.setenv("GREAM_REDIS_URL", "redis://cache:6379/2")
    s = Settings()
    assert s.port == 9001 and s.api_keys == ["first-key-1", "second-key-2"] and s.auth_enabled
    assert s.engine_urls == ["http://w1:8001", "http://w2:8001"]
    assert s.redis_url == "redis://cache:6379/2"
    assert "first-key-1" not in repr(s)  # keys never end up in logs


def test_overrides_skip_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREAM_PORT", "9001")
    s = load_settings({"port": None, "engine": "vllm", "engine_urls": ["http://x:1"]})
    assert s.port == 9001 and s.engine == "vllm" and s.engine_urls == ["http://x:1"]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"port": 0}, "port"),
    ({"engine": "tensorrt"}, "engine"),
    ({"redis_url": "http://cache:6379"}, "redis_url 'http://cache:6379' must start with redis://"),
    ({"engine_urls": ["w1:8001"]}, "must look like http://host:port"),
    ({"api_keys": ["short"]}, "shorter than 8 characters"),
    ({"history_cap": 5, "history_drop_chunk": 10}, "history_drop_chunk (10) exceeds history_cap (5)"),
    ({"max_reasoning_tokens": 10, "default_reasoning_tokens": 20}, "exceeds max_reasoning_tokens"),
    ({"dtype": "int4"}, "dtype"),
])
def test_invalid_settings_explain_themselves(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**kwargs)
    assert needle in str(info.value)


def test_reasoning_budget_default_respects_the_max() -> None:
    assert Settings(max_reasoning_tokens=100).reasoning_budget_default == 100
    assert Settings().reasoning_budget_default == 256


def test_json_log_lines_carry_the_request_id() -> None:
    from service.runtime import REQUEST_ID, JsonFormatter

    record = logging.LogRecord("gream.access", logging.INFO, __file__, 1, "request", None, None)
    record.status = 200
    token = REQUEST_ID.set("rid-42")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "rid-42" and line["msg"] == "request" and line["status"] == 200
    assert line["level"] == "info" and line["logger"] == "gream.access"


def test_engine_workers_reach_the_engine_and_split_the_cores() -> None:
    from service.engine.workers import worker_layout
    from service.engine_settings import local_engine_config

    config = local_engine_config(Settings(decode_workers=3, torch_threads=2))
    assert (config.kind, config.workers, config.torch_threads) == ("transformers", 3, 2)
    assert worker_layout(1, 3) == (1, 3)
    assert worker_layout(4, None)[0] == 4
    workers, threads = worker_layout(None, None)
    assert 1 <= workers <= 2 and threads >= 1
    with pytest.raises(ValueError, match="workers"):
        worker_layout(0, None)


def test_the_transformers_engine_runs_in_a_child_process_unless_told_otherwise() -> None:
    assert Settings().use_engine_subprocess  # its Python beam loop would share the gateway's GIL
    assert not Settings(engine="vllm").use_engine_subprocess  # AsyncLLM decodes in a process of its own
    assert not Settings(engine_subprocess=False).use_engine_subprocess
    assert Settings(engine="vllm", engine_subprocess=True).use_engine_subprocess


def test_a_renamed_variable_is_an_error_naming_its_new_name() -> None:
    from service.config import check_environment

    with pytest.raises(ValueError, match="GREAM_ENGINE_WORKERS is now GREAM_DECODE_WORKERS"):
        check_environment({"GREAM_ENGINE_WORKERS": "2"})
    assert check_environment({"GREAM_DECODE_WORKERS": "2", "GREAM_CACHE_DIR": "/tmp"}) == []


def test_a_misspelt_variable_is_warned_about_with_the_setting_it_resembles() -> None:
    from service.config import check_environment

    assert check_environment({"GREAM_MAX_BATCHES": "8"}) == [
        "GREAM_MAX_BATCHES is not a setting; did you mean GREAM_MAX_BATCH?"]
