"""The JAX backend for the engine builder: the Flax model in its final layout, the KV cache
spec and the `ModelRunner`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from xlaserve.checkpoints.loader import load_model
from xlaserve.config import EngineArgs, enable_compilation_cache
from xlaserve.engine.runner import ModelRunner
from xlaserve.engine.runner_api import KVCacheSpec, LoadedForRunner, RunnerConfig
from xlaserve.pooling.backend import load_for_pooling
from xlaserve.pooling.runner import PoolingRunner
from xlaserve.pooling.runner_choice import resolve_runner
from xlaserve.sharding.mesh import MODEL, make_mesh


class JaxBackend:
    name = "jax"

    def load(self, args: EngineArgs, mesh: Mesh | None) -> LoadedForRunner:
        enable_compilation_cache(args.compilation_cache_dir)
        if resolve_runner(args.model, args.runner, args.load_format) == "pooling":
            return load_for_pooling(args, mesh)
        if mesh is None and (args.tensor_parallel_size > 1 or jax.process_count() > 1):
            mesh = make_mesh(args.tensor_parallel_size)
        on_cpu = jax.default_backend() == "cpu"
        loaded = load_model(
            args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            seed=args.seed,
            mesh=mesh,
            attention_backend=args.attention_backend,
            # XLA's CPU backend copies each layer's weights out of stacked arrays on every
            # step; per-layer buffers are read in place (see Transformer.unstack_layers).
            layer_layout="per_layer" if mesh is None and on_cpu else "stacked",
        )
        # XLA's CPU backend has no 16-bit float scatter: it would convert the whole cache to
        # float32 and back around every cache write, so the CPU keeps the cache in float32.
        kv_dtype = "float32" if on_cpu else jnp.dtype(loaded.dtype).name
        spec = KVCacheSpec.for_model(
            loaded.config,
            page_size=args.page_size,
            dtype=kv_dtype,
            kv_head_shards=1 if mesh is None else mesh.shape[MODEL],
        )
        devices = jax.devices() if mesh is None else list(mesh.devices.flat)
        return LoadedForRunner(
            model=loaded.model,
            config=loaded.config,
            tokenizer=loaded.tokenizer,
            dtype_name=jnp.dtype(loaded.dtype).name,
            kv_cache_spec=spec,
            memory_device=devices[0],
            mesh=mesh,
        )

    def make_runner(self, model: LoadedForRunner, config: RunnerConfig) -> ModelRunner:
        if model.pooler is not None:
            return PoolingRunner(model.model, config, model.kv_cache_spec)
        return ModelRunner(model.model, config, model.kv_cache_spec, mesh=model.mesh)
