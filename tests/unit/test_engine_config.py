"""Engines take typed configs of their own; the gateway maps its settings onto them."""

from __future__ import annotations

import pickle

import pytest
from pydantic import TypeAdapter, ValidationError

from service.config import Settings
from service.engine.config import (
    LocalEngineConfig,
    ProcessOptions,
    RemoteEngineConfig,
    TransformersEngineConfig,
    VLLMEngineConfig,
)
from service.engine_settings import local_engine_config, process_options, remote_engine_config


def test_an_unknown_engine_field_is_an_error_naming_it() -> None:
    with pytest.raises(ValidationError, match="max_batchh"):
        TransformersEngineConfig(max_batchh=4)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="max_batch"):
        VLLMEngineConfig(max_batch=4)  # type: ignore[call-arg]  # vLLM batches by itself


def test_engine_configs_validate_their_values() -> None:
    with pytest.raises(ValidationError, match="default_beams"):
        TransformersEngineConfig(default_beams=0)
    with pytest.raises(ValidationError, match="executor"):
        VLLMEngineConfig(executor="ray")  # type: ignore[arg-type]


def test_settings_map_onto_the_chosen_engine() -> None:
    config = local_engine_config(Settings(engine="transformers", max_batch=7, default_beams=12, dtype="bfloat16"))
    assert isinstance(config, TransformersEngineConfig)
    assert (config.max_batch, config.default_beams, config.dtype) == (7, 12, "bfloat16")
    vllm = local_engine_config(Settings(engine="vllm", queue_max=9, reasoning_temperature=0.5))
    assert isinstance(vllm, VLLMEngineConfig) and (vllm.queue_max, vllm.reasoning_temperature) == (9, 0.5)


def test_remote_and_process_options_come_from_settings() -> None:
    settings = Settings(engine_urls="http://a:1,http://b:2", engine_timeout_s=3, engine_api_key="k" * 8,
                        log_json=False, log_level="debug")
    remote = remote_engine_config(settings, expected_version="v1")
    assert remote.urls == ["http://a:1", "http://b:2"] and remote.timeout_s == 3 and remote.expected_version == "v1"
    assert "k" * 8 not in repr(remote)  # the key stays out of logs
    assert process_options(settings) == ProcessOptions(log_json=False, log_level="debug")
    with pytest.raises(ValidationError, match="urls"):
        RemoteEngineConfig(urls=[])


def test_a_local_config_crosses_to_the_child_process_by_its_kind() -> None:
    adapter: TypeAdapter[LocalEngineConfig] = TypeAdapter(LocalEngineConfig)
    for config in (TransformersEngineConfig(workers=1), VLLMEngineConfig(block_size=64)):
        assert pickle.loads(pickle.dumps(config)) == config
        assert adapter.validate_python(config.model_dump()) == config
