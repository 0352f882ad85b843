"""The JAX backend's load for pooling models: what the engine builder needs (`LoadedForRunner`
with the model's `PoolerConfig`), on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlaserve.checkpoints import hf
from xlaserve.checkpoints.loader import DTYPES
from xlaserve.config import EngineArgs
from xlaserve.engine.runner_api import KVCacheSpec, LoadedForRunner
from xlaserve.pooling.loader import load_pooling_model
from xlaserve.pooling.runner_choice import hf_folder


def pooling_dtype(model: str, dtype: str, on_cpu: bool, load_format: str) -> str:
    """`auto` on the CPU is the checkpoint's dtype (config.json's `torch_dtype` / `dtype`,
    float32 when it names none, as transformers loads it), as vLLM's `auto` is: embeddings are
    compared with references, and bfloat16 costs MiniLM about 1e-4 of cosine against
    sentence-transformers (float32: 1e-6). Elsewhere, and for an explicit dtype, the engine's
    usual rule."""
    if dtype != "auto" or not on_cpu:
        return dtype
    folder = hf_folder(model) if load_format in ("auto", "hf") else None
    config = hf.read_config(folder) if folder is not None else {}
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"  # HF's default
    return stored if stored in DTYPES else dtype


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
        dtype=pooling_dtype(args.model, args.dtype, on_cpu, args.load_format),
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
