"""Ragged paged attention on the CPU kernel (attention.cc): the reference's contract
(xlaserve/kernels_pallas/ragged_paged_attention/reference.py), each page read once per
sequence and kv head instead of gathered per query row in small XLA ops.

A model laid out per layer on one CPU device uses it in place of the reference ("auto"
attention; see `pack.pack_for_cpu_kernel`) for float32 and bfloat16 caches with head dims a
multiple of 16 up to 256; int8 / fp8 caches stay on the reference, which reads their scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.kernels_cpu.build import PAGED_ATTENTION, library

BACKEND = "cpu"  # the attention backend name a model holds when it runs this kernel
CACHE_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_HEAD_DIM = 256  # attention.cc kMaxHeadDim


def available() -> bool:
    return jax.default_backend() == "cpu" and library() is not None


def supports(head_dim: int) -> bool:
    """Whether a model with this head dim can run the kernel in this process."""
    return available() and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM


def reads(kv_cache_dtype) -> bool:
    """Whether the kernel reads a cache of this dtype (the reference takes the others)."""
    return any(jnp.dtype(kv_cache_dtype) == jnp.dtype(d) for d in CACHE_DTYPES)


def ragged_paged_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """q [T, N, H], kv_cache [P, page_size, 2K, H] (float32 or bfloat16) -> [T, N, H] in q's
    dtype; arguments as the reference takes them."""
    if library() is None:  # builds and registers the kernels on first use
        raise RuntimeError("the CPU kernels are not built here; use the reference attention")
    out = jax.ffi.ffi_call(PAGED_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        sliding_window=np.int32(sliding_window or 0),
    )  # fmt: skip
    return out.astype(q.dtype)
