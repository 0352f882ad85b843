"""Attention over the paged KV cache: metadata, cache write and the attention implementation.

The engine keeps every layer's cache in one array [L, P, page_size, 2K, H]. Layer `l` is
addressed as pages `l * P + page` of the flattened [L * P, page_size, 2K, H] view, so both the
cache write and the attention read touch only that layer's pages, in place.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlaserve.kernels_pallas.kv_cache_update import reference as kv_update_reference
from xlaserve.kernels_pallas.ragged_paged_attention import reference as rpa_reference

ATTENTION_BACKENDS = ("reference",)


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
    backend: str = "reference",
) -> tuple[jax.Array, jax.Array]:
    """Writes layer `layer`'s new K/V, then attends over it.

    q: [T, N, H]; new_kv: [T, 2K, H]; kv_cache: [L, P, page_size, 2K, H]; layer: i32 scalar.
    Returns (kv_cache, out [T, N, H]).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention backend {backend!r} is not available; choose from {ATTENTION_BACKENDS}"
        )
    num_layers, num_pages, page_size = kv_cache.shape[:3]
    flat = kv_cache.reshape(num_layers * num_pages, *kv_cache.shape[2:])  # [L*P, ps, 2K, H]
    first_page = layer * num_pages
    slots = jnp.where(
        metadata.slot_mapping >= 0, metadata.slot_mapping + first_page * page_size, -1
    )
    flat = kv_update_reference.kv_cache_update(new_kv, flat, slots)
    out = rpa_reference.ragged_paged_attention(
        q,
        flat,
        metadata.kv_lens,
        metadata.page_indices + first_page,
        metadata.cu_q_lens,
        metadata.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
    )
    return flat.reshape(kv_cache.shape), out
