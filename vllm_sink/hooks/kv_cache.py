"""Touch point 4: the policy's KV cache spec and its manager (kv_manager.py) in vLLM's registry."""

from __future__ import annotations


def install() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from ..kv_manager import StreamingSinkManager, StreamingSinkSpec

    # Built-ins register lazily only while the registry is empty: fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager,
                                 uniform_type_base_spec=StreamingSinkSpec)
