"""The one place an engine is assembled: load (weights in their final layout) -> KV cache spec
-> pages from the memory budget -> scheduler and runner configs -> runner -> engine.

Backends come from a small registry of module paths, imported on demand, so the engine never
imports a backend and no backend imports the engine. A backend provides
`load(args, mesh) -> LoadedForRunner` and `make_runner(loaded, runner_config) -> Runner`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import time

from xlaserve.config import BACKENDS, EngineArgs, kv_cache_pages
from xlaserve.engine.dp_engine import DataParallelEngine
from xlaserve.engine.llm_engine import LLMEngine
from xlaserve.engine.runner_api import LoadedForRunner, Runner, RunnerConfig
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.lora.manager import LoRAConfig, LoRAManager
from xlaserve.multimodal.media import MediaPolicy
from xlaserve.pooling.limits import check_pooling_backend, pooling_limits
from xlaserve.spec_decode.policy import SpecDecodePolicy
from xlaserve.structured.manager import (
    StructuredOutputManager,
    make_backend,
    resolve_backend_name,
)

logger = logging.getLogger(__name__)

BACKEND_REGISTRY = {
    "jax": "xlaserve.engine.backend_jax:JaxBackend",
    "torch": "xlaserve.kernels_cuda.backend:TorchBackend",
}
assert set(BACKEND_REGISTRY) == set(BACKENDS)


def load_backend(name: str):
    if name not in BACKEND_REGISTRY:
        raise ValueError(f"backend must be one of {tuple(BACKEND_REGISTRY)}, got {name!r}")
    module, _, cls = BACKEND_REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def build_engine(args: EngineArgs) -> LLMEngine | DataParallelEngine:
    """The engine for these options: one replica, or a data-parallel set of them."""
    if args.data_parallel_size == 1:
        return build_replica(args)
    if args.backend != "jax":
        raise ValueError(f"backend {args.backend!r} runs on one device: data_parallel_size "
                         f"must be 1, got {args.data_parallel_size}")  # fmt: skip
    from xlaserve.sharding.mesh import make_mesh, replica_meshes

    mesh = make_mesh(
        args.tensor_parallel_size, args.data_parallel_size,
        expert_parallel_size=args.expert_parallel_size,
    )  # fmt: skip
    return DataParallelEngine([build_replica(args, m) for m in replica_meshes(mesh)])


def build_replica(args: EngineArgs, mesh=None) -> LLMEngine:
    """One engine on `mesh` (default: the first tensor_parallel_size devices when
    tensor_parallel_size > 1, else the default device). Warms the runner up."""
    model, scheduler_config, runner = build_runner(args, mesh)
    spec = args.speculative_config
    return LLMEngine(
        Scheduler(scheduler_config, None if spec is None else SpecDecodePolicy(spec)),
        runner,
        tokenizer=model.tokenizer,
        vocab_size=model.config.vocab_size,
        eos_token_ids=model.config.eos_token_ids,
        model_name=args.model,
        dtype=model.dtype_name,
        structured=None if model.pooler is not None else structured_outputs_for(args, model),
        lora=lora_manager_for(args, model),
        pooler=model.pooler,
        async_scheduling=args.async_scheduling,
        image_processor=model.image_processor,
        media_policy=MediaPolicy(args.allowed_local_media_path, args.allow_remote_media),
    )


def lora_config_for(args: EngineArgs) -> LoRAConfig | None:
    if not args.enable_lora:
        return None
    return LoRAConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras or args.max_loras)


def lora_manager_for(args: EngineArgs, model: LoadedForRunner) -> LoRAManager | None:
    """The host registry and cache of LoRA adapters, or None when LoRA is off."""
    config = lora_config_for(args)
    if config is not None and model.config.num_experts:
        raise ValueError(
            f"enable_lora is not supported for mixture-of-experts models "
            f"({model.config.architecture}: adapters on experts are not implemented)"
        )
    return None if config is None else LoRAManager(config, model.config)


def structured_outputs_for(args: EngineArgs, model: LoadedForRunner):
    """The grammar manager (its backend is built on first use), or None without a tokenizer."""
    name = args.structured_outputs_backend
    if name == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
        raise ValueError("structured_outputs_backend 'xgrammar' needs `pip install xgrammar`")
    if model.tokenizer is None:
        return None
    c = model.config
    factory = functools.partial(
        make_backend, name, model.tokenizer, vocab_size=c.vocab_size, eos_token_ids=c.eos_token_ids
    )
    return StructuredOutputManager(
        factory,
        vocab_size=c.vocab_size,
        compile_timeout_s=args.structured_outputs_timeout,
        backend_name=resolve_backend_name(name),
    )


def build_runner(args: EngineArgs, mesh=None) -> tuple[LoadedForRunner, SchedulerConfig, Runner]:
    """(loaded model, scheduler config, runner, not yet warmed up) for these options. Every
    process of a multi-host mesh builds the same."""
    backend = load_backend(args.backend)
    check_pooling_backend(args)
    start = time.perf_counter()
    logger.info("loading %s (backend %s, load format %s) ...", args.model, args.backend,
                args.load_format)  # fmt: skip
    model = backend.load(args, mesh)
    logger.info("loaded %s in %.1fs (weights %s, tokenizer %s)", args.model,
                time.perf_counter() - start, model.dtype_name,
                "loaded" if model.tokenizer is not None else "none")  # fmt: skip
    max_model_len = args.resolve_max_model_len(model.config.max_position_embeddings)
    if model.pooler is not None:
        max_model_len, args = pooling_limits(args, model.pooler, max_model_len)
    num_pages = kv_cache_pages(
        args,
        page_bytes=model.page_bytes,
        max_model_len=max_model_len,
        device=model.memory_device,
    )
    logger.info("KV cache: %d pages of %d tokens; compiling at warm-up next", num_pages,
                model.kv_cache_spec.page_size)  # fmt: skip
    runner_config = runner_config_for(
        args, max_model_len, num_pages, pooling=model.pooler is not None
    )
    if args.speculative_config is None:
        runner = backend.make_runner(model, runner_config)
    else:
        runner = backend.make_runner(model, runner_config, args.speculative_config)
    kv_window = windowed_kv(model.config)
    return model, scheduler_config_for(args, max_model_len, num_pages, kv_window), runner


def run_follower(args: EngineArgs) -> None:
    """A non-leader process of a multi-host mesh: same model and steps, no scheduling (the
    leader's warm-up reaches it as broadcast steps too)."""
    _, _, runner = build_runner(args)
    runner.follow()


def windowed_kv(config) -> int | None:
    """The attention window when every layer is windowed (pages before it can be released);
    None when any layer attends to everything (Gemma's global layers) or for encoders."""
    kinds = getattr(config, "layer_kinds", None)
    if not kinds or any(kind != "sliding" for kind in kinds):
        return None
    return config.sliding_window


def scheduler_config_for(
    args: EngineArgs, max_model_len: int, num_pages: int, kv_window: int | None = None
) -> SchedulerConfig:
    spec = args.speculative_config
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.resolve_max_num_batched_tokens(),
        max_model_len=max_model_len,
        page_size=args.page_size,
        num_pages=num_pages,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        policy=args.scheduling_policy,
        max_waiting_requests=args.max_waiting_requests,
        num_lookahead_tokens=0 if spec is None else spec.num_lookahead_tokens,
        max_loras=args.max_loras if args.enable_lora else None,
        max_encoder_features_per_step=(
            args.max_encoder_features_per_step or args.resolve_max_num_batched_tokens()
        ),
        kv_window=kv_window,
    )


# Measured on the CPU (SmolLM2, 2026-12-01): a one-token decode step costs what a two-token
# one does and 0.6x a 16-token one; encoders gain nothing from lengths below 16.
DEFAULT_MIN_DECODER_BUCKET = 1
DEFAULT_MIN_ENCODER_BUCKET = 16


def runner_config_for(
    args: EngineArgs, max_model_len: int, num_pages: int, *, pooling: bool = False
) -> RunnerConfig:
    return RunnerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.resolve_max_num_batched_tokens(),
        max_model_len=max_model_len,
        page_size=args.page_size,
        num_pages=num_pages,
        seed=args.seed,
        min_token_bucket=(
            args.min_token_bucket
            if args.min_token_bucket is not None
            else (DEFAULT_MIN_ENCODER_BUCKET if pooling else DEFAULT_MIN_DECODER_BUCKET)
        ),
        token_bucket_sizes=tuple(args.token_buckets) if args.token_buckets else None,
        num_speculative_tokens=(
            0 if args.speculative_config is None else args.speculative_config.num_speculative_tokens
        ),
        max_loras=args.max_loras if args.enable_lora else 0,
        max_lora_rank=args.max_lora_rank if args.enable_lora else 0,
    )
