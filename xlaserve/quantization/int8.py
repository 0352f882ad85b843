"""Symmetric 8-bit quantization: int8 per output channel (weights), per token (activations),
per row (the embedding table and LM head, one scale per vocabulary row), and float8_e4m3fn
per output channel or row.

A weight w [in, out] becomes q [in, out] and scale f32[out] with w ~= q * scale; a table
[V, D] becomes q [V, D] and scale f32[V]; an activation x [T, in] becomes q [T, in] and scale
f32[T, 1]. Rounding is to nearest, so every element is within scale / 2 of its original
(int8), and all-zero channels or rows get scale 1 (q = 0).
"""

import jax
import jax.numpy as jnp

INT8_MAX = 127.0
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


def _absmax_scale(x: jax.Array, axis: int, qmax: float) -> jax.Array:
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)
    return jnp.where(amax > 0, amax / qmax, 1.0)


def quantize_per_channel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [..., in, out] -> (int8 [..., in, out], f32 scale [..., out]); w ~= q * scale."""
    scale = _absmax_scale(w, -2, INT8_MAX)  # [..., 1, out]
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX)
    return q.astype(jnp.int8), scale[..., 0, :]


def quantize_per_channel_fp8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [..., in, out] -> (float8_e4m3fn [..., in, out], f32 scale [..., out])."""
    scale = _absmax_scale(w, -2, FP8_MAX)
    q = jnp.clip(w.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX)
    return q.astype(FP8_DTYPE), scale[..., 0, :]


def dequantize_per_channel(q: jax.Array, scale: jax.Array) -> jax.Array:
    """f32 [..., in, out] from q [..., in, out] and scale [..., out]."""
    return q.astype(jnp.float32) * scale[..., None, :]


def quantize_per_row(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [R, C] -> (int8 [R, C], f32 scale [R]); w ~= q * scale[:, None]."""
    scale = _absmax_scale(w, -1, INT8_MAX)  # [R, 1]
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX)
    return q.astype(jnp.int8), scale[:, 0]


def quantize_per_row_fp8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [R, C] -> (float8_e4m3fn [R, C], f32 scale [R])."""
    scale = _absmax_scale(w, -1, FP8_MAX)
    q = jnp.clip(w.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX)
    return q.astype(FP8_DTYPE), scale[:, 0]


def dequantize_per_row(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Rows [R, C] in `dtype` from q [R, C] and scale [R] (computed in f32, then rounded)."""
    return (q.astype(jnp.float32) * scale[:, None]).astype(dtype)


def quantize_per_token_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, in] -> (float8_e4m3fn [T, in], f32 scale [T, 1]), one scale per row (token)."""
    scale = _absmax_scale(x, -1, FP8_MAX)  # [T, 1]
    q = jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX)
    return q.astype(FP8_DTYPE), scale


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, in] -> (int8 [T, in], f32 scale [T, 1]), one scale per row (token)."""
    scale = _absmax_scale(x, -1, INT8_MAX)  # [T, 1]
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX)
    return q.astype(jnp.int8), scale


# Values per activation scale in quantization="gguf_a8" (llama.cpp's Q8_0 / Q8_1 block).
ACTIVATION_BLOCK = 32


def quantize_blocks(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (int8 [M, K], f32 scale [M, K / 32]): one scale per row and run of 32
    values, q = round(x * (127 / amax)) to nearest even, scale = amax / 127 (an all-zero run
    has scale 0). The CPU kernel (kernels_cpu/gguf_matmul_a8.cc) computes these same float32
    operations."""
    m, k = x.shape
    runs = x.astype(jnp.float32).reshape(m, k // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    amax = jnp.max(jnp.abs(runs), axis=-1, keepdims=True)
    inv = jnp.where(amax > 0, INT8_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.round(runs * inv).astype(jnp.int8)
    return q.reshape(m, k), (amax / INT8_MAX)[..., 0]


def dequantize_blocks(q: jax.Array, scale: jax.Array) -> jax.Array:
    """f32 [M, K] from quantize_blocks' (q, scale)."""
    m, k = q.shape
    runs = q.astype(jnp.float32).reshape(m, k // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    return (runs * scale[..., None]).reshape(m, k)
