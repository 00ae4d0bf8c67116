"""Settings -> Engine. The vLLM engine is imported only when asked for, so the gateway runs on
machines without vLLM."""

from __future__ import annotations

import inspect
from typing import Any

from model_store.bundle import Bundle
from service.config import Settings
from service.engine.base import Engine

# Settings every local engine may take as keyword arguments (each engine takes what it knows).
ENGINE_SETTINGS = ("default_beams", "queue_max", "max_batch", "batch_wait_ms", "batch_wait_max_ms", "torch_threads",
                   "dtype", "max_concurrent_reasoning", "reasoning_temperature", "engine_workers")
# Settings whose engine argument has a shorter name (inside an engine, "engine_" says nothing).
ARGUMENT_NAMES = {"engine_workers": "workers"}


def engine_kwargs(settings: Settings, engine_cls: type) -> dict[str, Any]:
    """The engine settings `engine_cls.__init__` accepts (all of them if it takes **kwargs)."""
    params = inspect.signature(engine_cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {ARGUMENT_NAMES.get(name, name): name for name in ENGINE_SETTINGS}
    return {arg: getattr(settings, name) for arg, name in named.items() if takes_any or arg in params}


def create_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The gateway's engine: remote workers, a local engine in a child process, or one in-process."""
    if settings.engine_urls:
        from service.engine.remote import RemoteEngine

        return RemoteEngine(settings.engine_urls, timeout_s=settings.engine_timeout_s,
                            api_key=settings.engine_api_key, expected_version=bundle.version)
    if settings.engine_in_child_process:
        from service.engine.process import ProcessEngine

        return ProcessEngine(settings, bundle)
    return create_local_engine(settings, bundle)


def create_local_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The model runtime itself (transformers or vLLM), in this process."""
    if settings.engine == "vllm":
        try:
            from service.engine.vllm_engine import VLLMEngine
        except ImportError as exc:
            raise RuntimeError(f"engine 'vllm' needs the vllm extra (pip install -e '.[vllm]'): {exc}") from exc
        return VLLMEngine(bundle, **engine_kwargs(settings, VLLMEngine))
    from service.engine.transformers_engine import TransformersEngine

    return TransformersEngine(bundle, **engine_kwargs(settings, TransformersEngine))
