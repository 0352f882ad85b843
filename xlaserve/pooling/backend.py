"""The JAX backend's load for pooling models: what the engine builder needs (`LoadedForRunner`
with the model's `PoolerConfig`), on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlaserve.config import EngineArgs
from xlaserve.engine.runner_api import KVCacheSpec, LoadedForRunner
from xlaserve.pooling.loader import load_pooling_model


def load_for_pooling(args: EngineArgs, mesh) -> LoadedForRunner:
    if mesh is not None or args.tensor_parallel_size != 1 or args.data_parallel_size != 1:
        raise ValueError(
            "pooling models run on one device: tensor_parallel_size and data_parallel_size "
            f"must be 1, got {args.tensor_parallel_size} and {args.data_parallel_size}"
        )
    on_cpu = jax.default_backend() == "cpu"
    loaded = load_pooling_model(
        args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        seed=args.seed,
        attention_backend=args.attention_backend,
        layer_layout="per_layer" if on_cpu else "stacked",
    )
    if loaded.is_encoder:  # no KV cache: zero-byte pages keep the scheduler's books
        spec = KVCacheSpec(0, args.page_size, 1, loaded.config.head_dim, "float32")
    else:
        kv_dtype = "float32" if on_cpu else jnp.dtype(loaded.dtype).name  # as for generation
        spec = KVCacheSpec.for_model(loaded.config, page_size=args.page_size, dtype=kv_dtype)
    return LoadedForRunner(
        model=loaded,
        config=loaded.config,
        tokenizer=loaded.tokenizer,
        dtype_name=jnp.dtype(loaded.dtype).name,
        kv_cache_spec=spec,
        memory_device=jax.devices()[0],
        pooler=loaded.pooler,
    )
