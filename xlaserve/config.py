"""Engine options (`EngineArgs`) and what is derived from them with the model and device in hand.

Options are frozen and validated at construction; derived values (max_model_len when unset,
the number of KV pages) are returned by functions, never written back into the options.
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax

from xlaserve.checkpoints.presets import DEFAULT_MODEL
from xlaserve.quantization.config import check_kv_cache_dtype, check_quantization
from xlaserve.spec_decode.config import SpeculativeConfig

DEFAULT_COMPILATION_CACHE = str(Path.home() / ".cache" / "xlaserve" / "jax")
# On the CPU (no device memory to size against), the default KV cache is what max_num_seqs
# sequences of max_model_len need, capped at this share of available host memory.
CPU_KV_SHARE = 0.3
ACCELERATOR_KV_FRACTION = 0.9
BACKENDS = ("jax", "torch")
RUNNERS = ("auto", "generate", "pooling")
STRUCTURED_BACKENDS = ("auto", "guidance", "xgrammar")


def _opt(default, help: str):
    """A field with its command-line help (the CLI flags are generated from these fields)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineArgs:
    """Every engine option; `xlaserve generate | chat | serve | bench` take each as a flag."""

    model: str = _opt(DEFAULT_MODEL, "bundled name, HF folder, .gguf file or orbax folder")
    dtype: str = _opt(
        "auto",
        "auto, float32, bfloat16 or float16 (auto: bfloat16 on TPU/GPU "
        "and on CPUs with bfloat16 dot instructions, else float32)",
    )
    load_format: str = _opt("auto", "auto, hf, gguf, orbax or dummy (random weights of a preset)")
    max_model_len: int | None = _opt(None, "longest prompt + output (default: the model's)")
    max_num_seqs: int = _opt(32, "sequences per step at most")
    max_num_batched_tokens: int | None = _opt(
        None,
        "token budget per step (default: max(512, max_num_seqs)); longer prompts are "
        "prefilled in chunks",
    )
    page_size: int = _opt(16, "tokens per KV-cache page")
    kv_cache_memory: int | float | None = _opt(
        None,
        "KV cache size: bytes (int) or a fraction of free device memory after the "
        "weights (float in (0, 1])",
    )
    enable_prefix_caching: bool = _opt(True, "reuse KV pages of identical prompt prefixes")
    enable_chunked_prefill: bool = _opt(True, "split long prompts over several steps")
    async_scheduling: bool = _opt(
        True,
        "schedule and pack the next step while the device runs this one; sampled tokens feed "
        "the next step on the device (steps with structured outputs or drafts run one at a "
        "time either way)",
    )
    scheduling_policy: str = _opt("fcfs", "fcfs or priority")
    max_waiting_requests: int | None = _opt(
        None, "refuse new requests beyond this many waiting (None: no limit)"
    )
    seed: int = _opt(0, "engine seed (sampling of requests without their own seed)")
    attention_backend: str = _opt(
        "auto",
        "paged attention: auto (cpu: reference, gpu: Pallas GPU, tpu: Mosaic), "
        "reference, gpu or tpu",
    )
    tensor_parallel_size: int = _opt(1, "devices each replica's weights are split over")
    data_parallel_size: int = _opt(1, "engine replicas")
    expert_parallel_size: int = _opt(
        1, "devices a mixture-of-experts model's experts are split over (x tensor_parallel_size)"
    )
    compilation_cache_dir: str | None = _opt(
        DEFAULT_COMPILATION_CACHE, "persistent XLA compilation cache (None: off)"
    )
    min_token_bucket: int | None = _opt(
        None,
        "smallest token bucket of the power-of-two set (None: 1 for generation, so a batch-1 "
        "decode runs a one-token graph; 16 for encoders, whose lengths gain nothing below)",
    )
    token_buckets: tuple[int, ...] | None = _opt(
        None, "explicit token buckets, e.g. 16,64,256 (the token budget is always added)"
    )
    backend: str = _opt("jax", "jax (the engine) or torch (the torch/Triton parity backend)")
    runner: str = _opt(
        "auto",
        "generate (text), pooling (embeddings, classification, scores) or auto (pooling for "
        "encoder and sequence-classification architectures, else generate)",
    )
    structured_outputs_backend: str = _opt(
        "auto",
        "grammar backend for structured outputs: auto (= guidance), guidance "
        "(llguidance) or xgrammar",
    )
    structured_outputs_timeout: float = _opt(
        30.0, "seconds a grammar may take to compile before its request fails"
    )
    speculative_config: SpeculativeConfig | dict | None = _opt(
        None,
        'speculative decoding as JSON with vLLM\'s keys, e.g. {"method": "ngram", '
        '"num_speculative_tokens": 4} (methods: ngram, draft_model, eagle, eagle3)',
    )
    enable_lora: bool = _opt(False, "serve LoRA adapters (requests name one with lora_request)")
    max_loras: int = _opt(4, "LoRA adapters resident on the device at once (one step's limit)")
    max_lora_rank: int = _opt(16, "largest LoRA rank accepted (smaller ranks are zero-padded)")
    max_cpu_loras: int | None = _opt(
        None, "LoRA adapters whose weights stay in host memory (default: max_loras)"
    )
    limit_mm_per_prompt: int = _opt(4, "images one prompt may hold (vision-language models)")
    max_image_pixels: int = _opt(4096 * 4096, "largest image accepted, in pixels (width * height)")
    max_encoder_features_per_step: int | None = _opt(
        None,
        "image feature rows the vision encoder may produce per step (default: the token "
        "budget); a prefill chunk stops before an image that would exceed it",
    )
    allowed_local_media_path: str | None = _opt(
        None, "a folder whose image files requests may name as file:// URLs (None: refused)"
    )
    allow_remote_media: bool = _opt(
        False, "let requests name http(s):// image URLs (fetched with size and time limits)"
    )
    quantization: str | None = _opt(
        None,
        "projection weights: int8 (per-channel, w8a16), w8a8 (int8 weights and per-token "
        "int8 activations), fp8 (e4m3 weights), gguf (a GGUF file's blocks kept packed), "
        "gguf_a8 (those blocks with int8 activations per 32 values, as llama.cpp); "
        "None: the model dtype",
    )
    kv_cache_dtype: str = _opt(
        "auto", "KV cache storage: auto (the model's), int8 or fp8 (with per-token scales)"
    )

    def __post_init__(self):
        for name in (
            "max_num_seqs",
            "page_size",
            "tensor_parallel_size",
            "data_parallel_size",
            "expert_parallel_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_token_bucket is not None and (
            isinstance(self.min_token_bucket, bool)
            or not isinstance(self.min_token_bucket, int)
            or self.min_token_bucket < 1
        ):
            raise ValueError(
                f"min_token_bucket must be a positive int or None, got {self.min_token_bucket!r}"
            )
        for name in ("limit_mm_per_prompt", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_encoder_features_per_step is not None and (
            isinstance(self.max_encoder_features_per_step, bool)
            or not isinstance(self.max_encoder_features_per_step, int)
            or self.max_encoder_features_per_step < 1
        ):
            raise ValueError("max_encoder_features_per_step must be a positive int or None, "
                             f"got {self.max_encoder_features_per_step!r}")  # fmt: skip
        if not isinstance(self.allow_remote_media, bool):
            raise ValueError(f"allow_remote_media must be a bool, got {self.allow_remote_media!r}")
        for name in ("max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2, got {value}")
        if self.token_buckets is not None and (
            not isinstance(self.token_buckets, tuple | list)
            or not self.token_buckets
            or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.token_buckets
            )
        ):
            raise ValueError(
                "token_buckets must be a non-empty tuple of positive ints, "
                f"got {self.token_buckets!r}"
            )
        kv = self.kv_cache_memory
        if kv is not None:
            if isinstance(kv, bool) or not isinstance(kv, int | float):
                raise ValueError(f"kv_cache_memory must be bytes (int) or a fraction, got {kv!r}")
            if isinstance(kv, float) and not 0.0 < kv <= 1.0:
                raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {kv}")
            if isinstance(kv, int) and kv <= 0:
                raise ValueError(f"kv_cache_memory must be positive, got {kv}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.structured_outputs_backend not in STRUCTURED_BACKENDS:
            raise ValueError(
                f"structured_outputs_backend must be one of {STRUCTURED_BACKENDS}, "
                f"got {self.structured_outputs_backend!r}"
            )
        timeout = self.structured_outputs_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"structured_outputs_timeout must be > 0 seconds, got {timeout!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        # Parsed once: a dict or JSON string becomes a validated SpeculativeConfig.
        object.__setattr__(
            self, "speculative_config", SpeculativeConfig.from_value(self.speculative_config)
        )
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora must be a bool, got {self.enable_lora!r}")
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is None and name == "max_cpu_loras":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")  # fmt: skip
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        check_quantization(self.quantization)
        check_kv_cache_dtype(self.kv_cache_dtype)

    def resolve_max_model_len(self, model_max: int) -> int:
        if self.max_model_len is None:
            return model_max
        if self.max_model_len > model_max:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {model_max}"
            )
        return self.max_model_len

    def resolve_max_num_batched_tokens(self) -> int:
        return self.max_num_batched_tokens or max(512, self.max_num_seqs)


def host_available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def device_free_bytes(device: jax.Device) -> int | None:
    """Free memory of an accelerator now (weights already placed); None on the CPU."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def kv_cache_pages(
    args: EngineArgs, *, page_bytes: int, max_model_len: int, device: jax.Device
) -> int:
    """Number of KV pages the memory budget buys; errors say how much one sequence needs."""
    pages_per_seq = math.ceil(max_model_len / args.page_size)
    if page_bytes == 0:  # no KV cache (an encoder): pages only keep the scheduler's books
        return args.max_num_seqs * pages_per_seq
    free = device_free_bytes(device)
    budget = args.kv_cache_memory
    if isinstance(budget, float):
        base = free if free is not None else host_available_bytes()
        budget_bytes = int(base * budget)
    elif isinstance(budget, int):
        budget_bytes = budget
    elif free is not None:
        budget_bytes = int(free * ACCELERATOR_KV_FRACTION)
    else:
        wanted = args.max_num_seqs * pages_per_seq * page_bytes
        budget_bytes = min(wanted, int(host_available_bytes() * CPU_KV_SHARE))
    num_pages = budget_bytes // page_bytes
    if num_pages < pages_per_seq:
        raise ValueError(
            f"kv_cache_memory of {budget_bytes} bytes holds {num_pages} pages of "
            f"{args.page_size} tokens, but one sequence of max_model_len {max_model_len} needs "
            f"{pages_per_seq} pages = {pages_per_seq * page_bytes} bytes; raise kv_cache_memory "
            f"or lower max_model_len"
        )
    return num_pages


def enable_compilation_cache(path: str | None) -> None:
    """Persistent XLA compilation cache, so a second start skips compiling."""
    if path is None or jax.config.jax_compilation_cache_dir:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
