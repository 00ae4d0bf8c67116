"""Prefix-cache hits that end inside a KV block, for a model with one full-attention KV group.

Every beam request of the vLLM engine is ``prompt + beam tokens``. vLLM 0.32 caches and matches
prefixes only in whole blocks (32 tokens at least on CPU) for such a model, so each of these requests
recomputes the prompt's partial last block. vLLM already has the machinery for finer hits: per-request
hashes every ``prefix_match_unit`` tokens, the prompt's tail registered as a partial entry
(``FullAttentionManager._cache_partial_tail_block``), the longest-hit search probing inside the first
non-full block (``FullAttentionManager.find_longest_cache_hit``) and a copy-on-write of the shared
tail block (``SingleTypeKVCacheManager._apply_cow``, copied by the model runner from
``SchedulerOutput.kv_cache_block_copies``). It switches it on only for hybrid Mamba models:
``resolve_kv_cache_block_sizes`` rejects a ``prefix_match_unit`` for a single group and
``UnitaryKVCacheCoordinator`` asserts that hashes are whole blocks.

This module turns it on for one group: naming ``FinePrefixScheduler`` as the engine's
``scheduler_cls`` makes vLLM's engine core import this module before it sizes its hashes, and the
two functions below are replaced there. Private API of vLLM 0.32, checked against that release on
CPU only; with another release, or on a GPU, the engine keeps whole-block matching
(``finer_prefix_matching``).
"""

from __future__ import annotations

import logging
from typing import Any

import vllm
import vllm.v1.engine.core as engine_core
from vllm.v1.core import kv_cache_manager
from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator, UnitaryKVCacheCoordinator
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec

SUPPORTED_VLLM = "0.32."

log = logging.getLogger("gream.engine")


class FinePrefixScheduler(Scheduler):
    """vLLM's scheduler; naming it loads this module in the engine core. Before each step it publishes
    the prompt tails the previous step computed (see FinePrefixCoordinator)."""

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        coordinator = self.kv_cache_manager.coordinator
        if isinstance(coordinator, FinePrefixCoordinator):
            coordinator.publish_computed_tails()
        return super().schedule(*args, **kwargs)


class FinePrefixCoordinator(UnitaryKVCacheCoordinator):
    """UnitaryKVCacheCoordinator whose hits land on any `hash_block_size` boundary.

    vLLM registers a prompt's tail when it schedules the prompt, before the step computes it. A full
    block registered early is safe (a request of the same step that hits it reads it during that
    step's forward pass, after it is written), but a partial hit is copied into a private block at
    the start of the step, before the forward pass: the copy would be stale. So tails are held back
    and published once the step that computes them is over (FinePrefixScheduler.schedule).
    """

    def __init__(self, kv_cache_config: Any, max_model_len: int, max_in_flight_tokens: int,
                 use_eagle: bool, enable_caching: bool, enable_kv_cache_events: bool, dcp_world_size: int,
                 pcp_world_size: int, scheduler_block_size: int, hash_block_size: int,
                 metrics_collector: Any = None, num_prefill_lookahead: int = 0):
        KVCacheCoordinator.__init__(
            self, kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle, enable_caching,
            enable_kv_cache_events, dcp_world_size=dcp_world_size, pcp_world_size=pcp_world_size,
            scheduler_block_size=scheduler_block_size, hash_block_size=hash_block_size,
            metrics_collector=metrics_collector, num_prefill_lookahead=num_prefill_lookahead)
        self.kv_cache_spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        self.dcp_world_size = self.single_type_managers[0].dcp_world_size
        self.pcp_world_size = pcp_world_size
        self.block_size = self.single_type_managers[0].block_size
        self.hash_block_size = hash_block_size
        self.single_type_managers[0].use_eagle = False
        self.enable_partial_hash_hits = True
        manager = self.single_type_managers[0]
        manager.cache_hit_alignment_tokens = hash_block_size
        self._held_tails: list[tuple[Any, Any, int]] = []  # (request, block, prefix length in tokens)
        manager._cache_partial_tail_block = self._hold_tail  # type: ignore[method-assign]

    def _hold_tail(self, request: Any, num_tokens: int) -> None:
        """FullAttentionManager._cache_partial_tail_block, but held back until the KV is computed."""
        manager = self.single_type_managers[0]
        boundary = (request.num_prompt_tokens - 1) // self.hash_block_size * self.hash_block_size
        if boundary == 0 or boundary > num_tokens or boundary % self.block_size == 0:
            return
        blocks = manager.req_to_blocks[request.request_id]
        index = boundary // self.block_size
        if index < len(blocks):
            self._held_tails.append((request, blocks[index], boundary))

    def publish_computed_tails(self) -> None:
        """Register the held tails; their blocks still hold that KV (freed blocks are reused only when
        the next step allocates, after this)."""
        held, self._held_tails = self._held_tails, []
        for request, block, boundary in held:
            self.block_pool.cache_partial_block(request=request, block=block, num_tokens=boundary,
                                                kv_cache_group_id=0, block_size=self.block_size)

    def find_longest_cache_hit(self, block_hashes: Any, max_cache_hit_length: int) -> Any:
        hit_blocks, hit_length = self.single_type_managers[0].find_longest_cache_hit(
            block_hashes=block_hashes, max_length=max_cache_hit_length, kv_cache_group_ids=[0],
            block_pool=self.block_pool, kv_cache_spec=self.kv_cache_spec, drop_eagle_block=False,
            alignment_tokens=self.hash_block_size, dcp_world_size=self.dcp_world_size,
            pcp_world_size=self.pcp_world_size)
        return hit_blocks, hit_length, 0


def _fine_grained(kv_cache_config: Any, vllm_config: Any) -> int | None:
    """The requested match unit when this module can honour it, else None."""
    cache = vllm_config.cache_config
    unit = cache.prefix_match_unit
    groups = kv_cache_config.kv_cache_groups
    if (unit is None or not cache.enable_prefix_caching or len(groups) != 1
            or type(groups[0].kv_cache_spec) is not FullAttentionSpec or use_eagle(vllm_config)):
        return None
    block = groups[0].kv_cache_spec.block_size
    return unit if unit < block and block % unit == 0 else None


def use_eagle(vllm_config: Any) -> bool:
    return vllm_config.speculative_config is not None


_resolve_block_sizes = engine_core.resolve_kv_cache_block_sizes
_make_coordinator = kv_cache_manager.get_kv_cache_coordinator


def resolve_kv_cache_block_sizes(kv_cache_config: Any, vllm_config: Any) -> tuple[int, int]:
    unit = _fine_grained(kv_cache_config, vllm_config)
    if unit is None:
        return _resolve_block_sizes(kv_cache_config, vllm_config)
    block = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    return block, unit


def get_kv_cache_coordinator(**kwargs: Any) -> KVCacheCoordinator:
    groups = kwargs["kv_cache_config"].kv_cache_groups
    if (kwargs["enable_caching"] and len(groups) == 1
            and kwargs["hash_block_size"] < kwargs["scheduler_block_size"]):
        return FinePrefixCoordinator(**kwargs)
    return _make_coordinator(**kwargs)


if vllm.__version__.startswith(SUPPORTED_VLLM):
    engine_core.resolve_kv_cache_block_sizes = resolve_kv_cache_block_sizes
    kv_cache_manager.get_kv_cache_coordinator = get_kv_cache_coordinator  # type: ignore[assignment]


def finer_prefix_matching(unit: int | None) -> dict[str, Any]:
    """Engine arguments for prefix hits every `unit` tokens (none when `unit` is None). The scheduler
    class travels to the engine core as a class reference, so that process imports this module (and
    patches its vLLM functions) while unpickling its configuration, before it sizes its hashes.

    Only with the vLLM release this was checked against, and only on CPU: elsewhere vLLM schedules the
    next step before the previous one has run (async scheduling), which the held-back tails rely on
    not happening. Otherwise matching stays whole blocks."""
    if unit is None:
        return {}
    from vllm.platforms import current_platform

    if not vllm.__version__.startswith(SUPPORTED_VLLM) or not current_platform.is_cpu():
        log.warning("prefix_match_unit ignored: it needs vLLM %sx on CPU (this is vLLM %s on %s)",
                    SUPPORTED_VLLM, vllm.__version__, current_platform.device_type)
        return {}
    return {"prefix_match_unit": unit, "scheduler_cls": FinePrefixScheduler}
