"""The gateway's settings mapped onto its engine's own config, and the engine built from them.

Engines know nothing of `Settings` (docs/architecture.md): this module is the one place that says
which setting becomes which engine field."""

from __future__ import annotations

from model_store.bundle import Bundle
from service.config import Settings
from service.engine.base import Engine
from service.engine.config import (
    LocalEngineConfig,
    ProcessOptions,
    RemoteEngineConfig,
    TransformersEngineConfig,
    VLLMEngineConfig,
)


def local_engine_config(settings: Settings) -> LocalEngineConfig:
    """The config of the model runtime (transformers or vLLM) that `settings` describe."""
    common = {"default_beams": settings.default_beams, "queue_max": settings.queue_max, "dtype": settings.dtype,
              "max_concurrent_reasoning": settings.max_concurrent_reasoning,
              "reasoning_temperature": settings.reasoning_temperature}
    if settings.engine == "vllm":
        return VLLMEngineConfig(**common)
    return TransformersEngineConfig(**common, max_batch=settings.max_batch, batch_wait_ms=settings.batch_wait_ms,
                                    batch_wait_max_ms=settings.batch_wait_max_ms,
                                    workers=settings.decode_workers, torch_threads=settings.torch_threads)


def process_options(settings: Settings) -> ProcessOptions:
    return ProcessOptions(log_json=settings.log_json, log_level=settings.log_level)


def remote_engine_config(settings: Settings, expected_version: str | None) -> RemoteEngineConfig:
    return RemoteEngineConfig(urls=settings.engine_urls, timeout_s=settings.engine_timeout_s,
                              api_key=settings.engine_api_key, expected_version=expected_version)


def create_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The gateway's engine: remote workers, a local engine in a child process, or one in-process."""
    if settings.engine_urls:
        from service.engine.remote import RemoteEngine

        return RemoteEngine(remote_engine_config(settings, expected_version=bundle.version))
    config = local_engine_config(settings)
    if settings.use_engine_subprocess:
        from service.engine.process import ProcessEngine

        return ProcessEngine(bundle, config, process_options(settings))
    from service.engine.factory import create_local_engine

    return create_local_engine(config, bundle)
