"""The JAX backend for the engine builder: the Flax model in its final layout, the KV cache
spec and the `ModelRunner`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from xlaserve.checkpoints.loader import load_model
from xlaserve.config import EngineArgs, enable_compilation_cache
from xlaserve.engine.runner import ModelRunner
from xlaserve.engine.runner_api import KVCacheSpec, LoadedForRunner, RunnerConfig
from xlaserve.models.attention import resolve_backend
from xlaserve.pooling.backend import load_for_pooling
from xlaserve.pooling.runner import PoolingRunner
from xlaserve.pooling.runner_choice import resolve_runner
from xlaserve.quantization.kv_cache import kv_cache_storage
from xlaserve.sharding.mesh import MODEL, make_mesh
from xlaserve.spec_decode.draft_model import check_draft_fits
from xlaserve.spec_decode.eagle import load_eagle_head


class JaxBackend:
    name = "jax"

    def load(self, args: EngineArgs, mesh: Mesh | None) -> LoadedForRunner:
        enable_compilation_cache(args.compilation_cache_dir)
        if args.enable_lora and jax.process_count() > 1:
            raise ValueError("LoRA adapters (enable_lora=True) are served on one host; this "
                             f"mesh spans {jax.process_count()} processes")  # fmt: skip
        if resolve_runner(args.model, args.runner, args.load_format) == "pooling":
            if args.quantization is not None or args.kv_cache_dtype != "auto":
                raise ValueError(
                    f"quantization={args.quantization!r} and kv_cache_dtype="
                    f"{args.kv_cache_dtype!r} apply to generating models; runner 'pooling' "
                    "serves 16/32-bit weights (leave both unset)"
                )
            return load_for_pooling(args, mesh)
        parallel = args.tensor_parallel_size * args.expert_parallel_size > 1
        if mesh is None and (parallel or jax.process_count() > 1):
            mesh = make_mesh(
                args.tensor_parallel_size, expert_parallel_size=args.expert_parallel_size
            )
        target = self._load(args, args.model, args.load_format, args.dtype, mesh)
        spec = args.speculative_config
        if spec is None or spec.method == "ngram":
            return target
        if spec.method == "draft_model":
            if mesh is not None:
                raise ValueError(
                    "speculative_config method 'draft_model' runs on one device; "
                    "tensor/data parallel meshes are not supported with it yet"
                )
            draft = self._load(args, spec.model, spec.load_format, spec.dtype, mesh)
            check_draft_fits(target, draft, spec.model)
        else:
            draft = load_eagle_head(spec, target)
        return dataclasses.replace(target, draft=draft)

    def _load(self, args: EngineArgs, model: str, load_format: str, dtype: str, mesh):
        on_cpu = jax.default_backend() == "cpu"
        loaded = load_model(
            model,
            load_format=load_format,
            dtype=dtype,
            seed=args.seed,
            mesh=mesh,
            attention_backend=args.attention_backend,
            # XLA's CPU backend copies each layer's weights out of stacked arrays on every
            # step; per-layer buffers are read in place (see Transformer.unstack_layers).
            layer_layout="per_layer" if mesh is None and on_cpu else "stacked",
            quantization=args.quantization,
        )
        # XLA's CPU backend has no 16-bit float scatter: it would convert the whole cache to
        # float32 and back around every cache write, so the CPU keeps the cache in float32.
        kv_dtype = "float32" if on_cpu else jnp.dtype(loaded.dtype).name
        resolve_backend(args.attention_backend)  # an unknown or unrunnable backend: ValueError
        kv_dtype, scale_elements = kv_cache_storage(args.kv_cache_dtype, kv_dtype)
        spec = KVCacheSpec.for_model(
            loaded.config,
            page_size=args.page_size,
            dtype=kv_dtype,
            kv_head_shards=1 if mesh is None else mesh.shape[MODEL],
            scale_elements=scale_elements,
        )
        devices = jax.devices() if mesh is None else list(mesh.devices.flat)
        vision = image_processor = None
        if loaded.vision is not None:
            from xlaserve.multimodal.build import build_multimodal

            vision, image_processor = build_multimodal(
                loaded.vision, loaded.tokenizer, loaded.dtype, args
            )
        return LoadedForRunner(
            model=loaded.model,
            config=loaded.config,
            tokenizer=loaded.tokenizer,
            dtype_name=jnp.dtype(loaded.dtype).name,
            kv_cache_spec=spec,
            memory_device=devices[0],
            mesh=mesh,
            vision=vision,
            image_processor=image_processor,
        )

    def make_runner(
        self, model: LoadedForRunner, config: RunnerConfig, speculative_config=None
    ) -> ModelRunner:
        if model.pooler is not None:
            if speculative_config is not None:
                raise ValueError("speculative_config drafts tokens for generation; a pooling "
                                 "model (runner 'pooling') generates none")  # fmt: skip
            return PoolingRunner(model.model, config, model.kv_cache_spec)
        proposer = None
        if speculative_config is not None:
            from xlaserve.spec_decode.build import make_proposer

            proposer = make_proposer(speculative_config, model, config)
        return ModelRunner(
            model.model, config, model.kv_cache_spec, mesh=model.mesh, proposer=proposer,
            vision=model.vision,
        )  # fmt: skip
