"""The runner contract: the one interface between the device-free engine and a backend.

An engine drives exactly this (`LLMEngine`, the data-parallel front, servers); a backend (the
JAX runner, the torch parity runner, the tests' mock) implements it. Everything crossing it is
plain data: a `SchedulerOutput` in, a `RunnerOutput` out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from xlaserve.engine.scheduler_output import SchedulerOutput


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... capped by largest, which is always included."""
    buckets, b = [], max(1, min(smallest, largest))
    while b < largest:
        buckets.append(b)
        b *= 2
    return (*buckets, largest)


@dataclass(frozen=True)
class RunnerConfig:
    """What every runner is built with (besides its model and KV cache spec)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_pages: int
    seed: int = 0
    min_token_bucket: int = 16
    # An explicit token-bucket set (e.g. from `xlaserve bench buckets`); the token budget is
    # always added as the largest bucket.
    token_bucket_sizes: tuple[int, ...] | None = None
    num_speculative_tokens: int = 0  # K: drafts a sequence may feed per step (0: none)
    # LoRA: adapter slots on the device and the rank they hold (0: no LoRA).
    max_loras: int = 0
    max_lora_rank: int = 0

    @property
    def token_buckets(self) -> tuple[int, ...]:
        if self.token_bucket_sizes:
            sizes = {b for b in self.token_bucket_sizes if b < self.max_num_batched_tokens}
            return (*sorted(sizes), self.max_num_batched_tokens)
        return power_of_two_buckets(self.min_token_bucket, self.max_num_batched_tokens)

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        return power_of_two_buckets(1, self.max_num_seqs)

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


# Cache dtypes numpy does not name without ml_dtypes (this module stays device-free).
NON_NUMPY_ITEMSIZE = {"bfloat16": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class KVCacheSpec:
    """The one definition of the paged KV cache layout: [L, P, page_size, 2K, H], K and V
    interleaved per KV head on axis 3. `kv_head_shards` devices split the K axis between them
    when the heads divide (tensor parallel); a page's bytes are those one device holds."""

    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # numpy name: "float32", "bfloat16", "int8", "float8_e4m3fn" ...
    kv_head_shards: int = 1
    # Quantized caches (int8, fp8) keep each head row's scale in this many extra trailing
    # elements of the H axis (see xlaserve/quantization/kv_cache.py); 0 otherwise.
    scale_elements: int = 0

    @classmethod
    def for_model(
        cls,
        config,
        *,
        page_size: int,
        dtype: str,
        kv_head_shards: int = 1,
        scale_elements: int = 0,
    ) -> KVCacheSpec:
        """The spec of a model config (anything with num_layers, num_kv_heads, head_dim)."""
        return cls(config.num_layers, page_size, config.num_kv_heads, config.head_dim, dtype,
                   kv_head_shards, scale_elements)  # fmt: skip

    def shape(self, num_pages: int) -> tuple[int, int, int, int, int]:
        row = self.head_dim + self.scale_elements
        return (self.num_layers, num_pages, self.page_size, 2 * self.num_kv_heads, row)

    @property
    def itemsize(self) -> int:
        if self.dtype in NON_NUMPY_ITEMSIZE:
            return NON_NUMPY_ITEMSIZE[self.dtype]
        return np.dtype(self.dtype).itemsize

    @property
    def heads_split(self) -> bool:
        return self.kv_head_shards > 1 and self.num_kv_heads % self.kv_head_shards == 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, on one device."""
        heads = self.num_kv_heads // self.kv_head_shards if self.heads_split else self.num_kv_heads
        return self.num_layers * 2 * heads * (self.head_dim + self.scale_elements) * self.itemsize

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.bytes_per_token

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)


@dataclass(frozen=True)
class LoadedForRunner:
    """What a backend's `load` hands the engine builder: its model in the final layout and the
    facts the builder needs to size the KV cache and build the engine."""

    model: object  # the backend's model (a Flax Transformer, a TorchTransformer)
    config: object  # its TransformerConfig
    tokenizer: object | None
    dtype_name: str  # the weights' dtype
    kv_cache_spec: KVCacheSpec
    memory_device: object  # `platform` and `memory_stats()`: where free memory is read
    mesh: object | None = None
    draft: LoadedForRunner | None = None  # speculative decoding's draft model, if any

    @property
    def page_bytes(self) -> int:
        """Bytes of one KV page on one device: the target's, plus the draft's (its cache
        shares the target's page ids)."""
        extra = 0 if self.draft is None else self.draft.kv_cache_spec.page_bytes
        return self.kv_cache_spec.page_bytes + extra

    # A pooling model's defaults (xlaserve.pooling.model_config.PoolerConfig); None: generative.
    pooler: object | None = None
    # A vision-language model: the runner's VisionEncoder and the intake's ImageProcessor
    # (xlaserve/multimodal); None: text only.
    vision: object | None = None
    image_processor: object | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """Where a runner runs: platform, the devices it spans and its mesh's axis sizes."""

    platform: str  # "cpu", "gpu", "tpu", "cuda"
    num_devices: int
    mesh_shape: dict[str, int] = field(default_factory=dict)  # {} when there is no mesh
    device_kind: str = ""
    parameter_count: int = 0  # model parameters (all shards together)
    parameter_bytes: int = 0  # their bytes in the weights' dtype


@dataclass(frozen=True)
class StepCosts:
    """Seconds of a step's parts, measured at warm-up: the forward by token bucket, the
    sampler and the draft verifier by sequence bucket."""

    forward: dict[int, float]
    sample: dict[int, float]
    verify: dict[int, float]


@dataclass
class RunnerStats:
    """Counters a runner keeps (read by engine metrics)."""

    compiles: int = 0
    compiles_after_warmup: int = 0
    warmup_seconds: float | None = None
    device_seconds: float = 0.0  # dispatch of a step's forward -> its tokens on the host
    # Speculative decoding: the step costs measured at warm-up, and the seconds spent drafting.
    step_costs: StepCosts | None = None
    propose_seconds: float = 0.0
    # Seconds the host waited for sampled tokens (the rest of a step's wall time is host work).
    wait_seconds: float = 0.0


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None  # raw-model logprob of `token`, when logprobs were asked for
    top_logprobs: list[tuple[int, float]] | None = None  # best `logprobs` (id, logprob)


@dataclass
class PromptLogprob:
    position: int  # index in the prompt of the scored token (>= 1)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclass
class RunnerOutput:
    sampled: dict[int, SampledToken] = field(default_factory=dict)  # seq_id -> token
    # Speculative decoding: seq_id -> the drafts accepted in this step (they precede its
    # sampled token), and seq_id -> the tokens drafted for its next step.
    accepted: dict[int, list[SampledToken]] = field(default_factory=dict)
    drafts: dict[int, list[int]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[PromptLogprob]] = field(default_factory=dict)
    # Pooling runners: seq_id -> the finished output of a sequence whose prompt was processed
    # (embedding f32[D'] or class scores f32[C]); such a sequence finishes without a token.
    pooled: dict[int, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    """What every backend's runner provides."""

    kv_cache_spec: KVCacheSpec

    def warmup(self) -> None:
        """Compiles (or otherwise prepares) every graph a step can need."""

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        """Runs one step; returns a token for every scheduled sequence whose chunk reaches its
        last known token, and prompt logprobs where asked for."""

    def device_info(self) -> DeviceInfo: ...

    def stats(self) -> RunnerStats: ...

    def shutdown(self) -> None:
        """Releases what the runner holds beyond this process (multi-host followers)."""
