"""Engine config -> Engine. The vLLM engine is imported only when asked for, so the gateway runs on
machines without vLLM."""

from __future__ import annotations

from model_store.bundle import Bundle
from service.engine.base import Engine
from service.engine.config import LocalEngineConfig, TransformersEngineConfig, VLLMEngineConfig


def create_local_engine(config: LocalEngineConfig, bundle: Bundle) -> Engine:
    """The model runtime itself (transformers or vLLM), in this process."""
    if isinstance(config, VLLMEngineConfig):
        try:
            from service.engine.vllm_engine import VLLMEngine
        except ImportError as exc:
            raise RuntimeError(f"engine 'vllm' needs the vllm extra (pip install -e '.[vllm]'): {exc}") from exc
        return VLLMEngine(bundle, config)
    if isinstance(config, TransformersEngineConfig):
        from service.engine.transformers_engine import TransformersEngine

        return TransformersEngine(bundle, config)
    raise TypeError(f"not a local engine config: {type(config).__name__}")
