"""Each engine's own typed configuration. The gateway maps its settings onto these
(service/engine_settings.py); a field an engine does not know is an error, never silently dropped."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["float32", "bfloat16", "float16"]


class _EngineConfig(BaseModel):
    """What every local engine takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_beams: int = Field(10, ge=1, le=1000, description="beam width when a request names none (>= k)")
    queue_max: int = Field(256, ge=1, description="requests waiting before EngineOverloaded")
    dtype: DType = "float32"
    max_concurrent_reasoning: int = Field(16, ge=1, description="reasoning streams decoding at once")
    reasoning_temperature: float = Field(0.0, ge=0, description="0 = greedy")
    seed: int = 0


class TransformersEngineConfig(_EngineConfig):
    kind: Literal["transformers"] = "transformers"
    max_batch: int = Field(32, ge=1, description="requests per forward pass")
    batch_wait_ms: float = Field(10.0, ge=0, description="longest wait for the next request of a batch")
    batch_wait_max_ms: float = Field(50.0, ge=0, description="longest wait for a batch to fill, in all")
    workers: int | None = Field(None, ge=1, description="decode workers; unset = 2 on two or more cores")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker; unset = cores / workers")


class VLLMEngineConfig(_EngineConfig):
    kind: Literal["vllm"] = "vllm"
    enforce_eager: bool = True
    # CPU attention needs block sizes that are multiples of 32; small blocks let the prefix cache
    # serve most of a short prompt (only full blocks are cached).
    block_size: int = Field(32, ge=1)
    max_num_seqs: int = Field(512, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    # Prefix-cache hits may end every this many tokens inside a block (service.engine.vllm_prefix), so
    # a beam request copies its prompt's partial last block instead of recomputing it; None: whole
    # blocks (also what vLLM on a GPU or another vLLM release gets).
    prefix_match_unit: int | None = Field(1, ge=1)
    # How far a beam request goes on below its node (service.engine.vllm_beam): through single-child
    # nodes only, or along the most likely child.
    beam_lookahead: Literal["chain", "greedy"] = "chain"
    executor: Literal["uni", "mp"] = "mp"
    # CUDA builds only (docs/deploy.md, "vLLM on a GPU"); None leaves vLLM's own default.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)


LocalEngineConfig = Annotated[TransformersEngineConfig | VLLMEngineConfig, Field(discriminator="kind")]


class ProcessOptions(BaseModel):
    """How a local engine runs in a child process (service.engine.process)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_timeout_s: float = Field(900.0, gt=0)
    restart_backoff_s: float = Field(1.0, gt=0)
    log_json: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class RemoteEngineConfig(BaseModel):
    """Engine workers reached over HTTP (service.engine.remote)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: list[str] = Field(min_length=1)
    timeout_s: float = Field(30.0, gt=0)
    api_key: str | None = Field(None, repr=False)
    expected_version: str | None = None
    health_interval_s: float = Field(5.0, gt=0)
