"""Attention over the paged KV cache: metadata, cache write and the attention implementation.

The engine keeps every layer's cache in one array [L, P, page_size, 2K, H]. Layer `l` is
addressed as pages `l * P + page` of the flattened [L * P, page_size, 2K, H] view, so both the
cache write and the attention read touch only that layer's pages, in place.

Backends (`ATTENTION_BACKENDS`): "reference" (plain jnp, the CPU path), "tpu" (Mosaic
kernels for the cache write and the attention), "gpu" (XLA scatter for the write, the Triton
attention kernel), and "auto", which picks by `jax.default_backend()`: tpu -> "tpu",
gpu -> "gpu", anything else -> "reference". A kernel backend named on a CPU host runs in its
interpreter (slow; for tests); naming one on the other accelerator is a ValueError.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlaserve.kernels_cpu import attention as cpu_attention
from xlaserve.kernels_pallas.kv_cache_update import kv_cache_update
from xlaserve.kernels_pallas.ragged_paged_attention import ragged_paged_attention, resolve_impl
from xlaserve.quantization.kv_cache import is_quantized_kv, quantize_kv

ATTENTION_BACKENDS = ("auto", "reference", "tpu", "gpu")


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """The concrete backend ("reference", "tpu" or "gpu") that `backend` means on `platform`.

    Raises ValueError naming the choices for an unknown backend, or when a kernel backend
    cannot run on the platform.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention backend {backend!r} is not available; choose from {ATTENTION_BACKENDS}"
        )
    return resolve_impl(backend, platform)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where each new token's K/V goes and which pages each sequence reads.

    slot_mapping: i32[T] flat slot (page * page_size + offset) per token, -1 for padding.
    cu_q_lens: i32[S + 1] cumulative new-token counts per sequence.
    kv_lens: i32[S] tokens in the cache per sequence after this step.
    page_indices: i32[S, pages_per_seq] page table.
    num_seqs: i32[1] number of real sequences.
    """

    slot_mapping: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    num_seqs: jax.Array


def write_and_attend(
    q: jax.Array,
    new_kv: jax.Array,
    kv_cache: jax.Array,
    layer: jax.Array,
    metadata: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    backend: str = "reference",
) -> tuple[jax.Array, jax.Array]:
    """Writes layer `layer`'s new K/V, then attends over it.

    q: [T, N, H]; new_kv: [T, 2K, H]; kv_cache: [L, P, page_size, 2K, H]; layer: i32 scalar.
    backend: one of ATTENTION_BACKENDS (see the module docstring), or "cpu": the CPU kernel
    (xlaserve/kernels_cpu/attention.py), which a model on one CPU device holds in place of
    "auto"; caches it does not read (int8 / fp8) take the reference.
    Returns (kv_cache, out [T, N, H]).
    """
    cpu_kernel = backend == cpu_attention.BACKEND and cpu_attention.reads(kv_cache.dtype)
    impl = resolve_backend("reference" if backend == cpu_attention.BACKEND else backend)
    interpret = impl != "reference" and jax.default_backend() == "cpu"
    num_layers, num_pages, page_size = kv_cache.shape[:3]
    flat = kv_cache.reshape(num_layers * num_pages, *kv_cache.shape[2:])  # [L*P, ps, 2K, H]
    first_page = layer * num_pages
    slots = jnp.where(
        metadata.slot_mapping >= 0, metadata.slot_mapping + first_page * page_size, -1
    )
    if is_quantized_kv(kv_cache.dtype):  # 8-bit values with per-row scales
        new_kv = quantize_kv(new_kv, kv_cache.dtype)  # [T, 2K, H + 2]
    update_impl = "tpu" if impl == "tpu" else "reference"
    flat = kv_cache_update(new_kv, flat, slots, impl=update_impl, interpret=interpret)
    args = (q, flat, metadata.kv_lens, metadata.page_indices + first_page, metadata.cu_q_lens,
            metadata.num_seqs)  # fmt: skip
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if cpu_kernel:
        out = cpu_attention.ragged_paged_attention(*args, **options)
    else:
        out = ragged_paged_attention(*args, **options, impl=impl, interpret=interpret)
    return flat.reshape(kv_cache.shape), out
