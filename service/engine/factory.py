"""Engine config -> Engine. The vLLM engine is imported only when asked for, so the gateway runs on
machines without vLLM."""

from __future__ import annotations

from model_store.bundle import Bundle
from service.engine.base import Engine
from service.engine.config import LocalEngineConfig, TransformersEngineConfig, VLLMEngineConfig


def engine_class(kind: str) -> type[Engine]:
    """The class of a local engine kind, imported on first use. Import it once at start-up: vLLM's
    import keeps the importing frames alive, and with them whatever engine they hold."""
    if kind == "vllm":
        try:
            from service.engine.vllm_engine import VLLMEngine
        except ImportError as exc:
            raise RuntimeError(f"engine 'vllm' needs the vllm extra (pip install -e '.[vllm]'): {exc}") from exc
        return VLLMEngine
    if kind == "transformers":
        from service.engine.transformers_engine import TransformersEngine

        return TransformersEngine
    raise ValueError(f"unknown engine kind {kind!r}")


def create_local_engine(config: LocalEngineConfig, bundle: Bundle) -> Engine:
    """The model runtime itself (transformers or vLLM), in this process."""
    if not isinstance(config, TransformersEngineConfig | VLLMEngineConfig):
        raise TypeError(f"not a local engine config: {type(config).__name__}")
    return engine_class(config.kind)(bundle, config)  # type: ignore[call-arg]
