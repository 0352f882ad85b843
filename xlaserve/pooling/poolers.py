"""Poolers: a step's hidden states -> one row per sequence (on the device; the host-side
finish of each output is in postprocess.py).

One graph serves any mix of pooling types in a batch: the mean, first and last token of every
sequence are cheap next to the forward pass, so all three are formed and each row picks its
own (`methods`). Sequences are whole in the step (pooling prompts are never chunked), so a
sequence's tokens are rows cu_q_lens[r] ... cu_q_lens[r + 1] - 1 of the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlaserve.pooling.params import POOLING_TYPES

METHOD_IDS = {name: i for i, name in enumerate(POOLING_TYPES)}  # MEAN 0, CLS 1, LAST 2


def token_rows(cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """The sequence row of every token i32[T] (R, one past the last row, for padding)."""
    starts = cu_q_lens[1:]  # [R] end of each row
    return jnp.searchsorted(starts, jnp.arange(num_tokens, dtype=starts.dtype), side="right")


def pool_hidden(hidden: jax.Array, cu_q_lens: jax.Array, methods: jax.Array) -> jax.Array:
    """hidden [T, D], cu_q_lens i32[R + 1], methods i32[R] (METHOD_IDS) -> pooled f32[R, D].
    Empty (padding) rows give zeros for MEAN and an arbitrary real row otherwise."""
    num_rows = methods.shape[0]
    h32 = hidden.astype(jnp.float32)
    rows = token_rows(cu_q_lens, hidden.shape[0])  # [T]
    sums = jax.ops.segment_sum(h32, rows, num_segments=num_rows + 1)[:num_rows]  # [R, D]
    counts = (cu_q_lens[1:] - cu_q_lens[:-1]).astype(jnp.float32)  # [R]
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    first = h32[cu_q_lens[:-1]]  # [R, D]
    last = h32[jnp.maximum(cu_q_lens[1:] - 1, 0)]  # [R, D]
    m = methods[:, None]
    return jnp.where(m == METHOD_IDS["MEAN"], mean, jnp.where(m == METHOD_IDS["CLS"], first, last))


def pool_padded(hidden: jax.Array, lengths: jax.Array, methods: jax.Array) -> jax.Array:
    """hidden [S, L, D] (rows padded), lengths i32[S], methods i32[S] -> pooled f32[S, D]."""
    S, L = hidden.shape[:2]
    h32 = hidden.astype(jnp.float32)
    valid = (jnp.arange(L)[None, :] < lengths[:, None]).astype(jnp.float32)  # [S, L]
    mean = jnp.einsum("sld,sl->sd", h32, valid) / jnp.maximum(lengths, 1)[:, None]
    first = h32[:, 0]  # [S, D]
    last = h32[jnp.arange(S), jnp.maximum(lengths - 1, 0)]  # [S, D]
    m = methods[:, None]
    return jnp.where(m == METHOD_IDS["MEAN"], mean, jnp.where(m == METHOD_IDS["CLS"], first, last))
