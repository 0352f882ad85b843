"""8-bit paged KV cache: values and their scales in one array.

Each cached head row (one token's K or V of one KV head, H values) is stored as H 8-bit values
followed by its scale, a bfloat16 bit-cast into `SCALE_ELEMENTS` 8-bit elements: the cache is
[L, P, page_size, 2K, H + 2] int8 or float8_e4m3fn. One array keeps every seam that moves the
cache (donation, sharding on the 2K axis, page copies, the cache write) unchanged, and a page
costs (H + 2) / 2H of a bfloat16 page: 66 / 128 bytes at H = 64, 1.94x the pages.

Scales are per token and head (absmax / qmax), computed when the token is written, so nothing
needs calibrating and no later token changes an earlier one's values. Every attention
implementation reads this layout: the reference (`dequantize_kv`), and the TPU and GPU kernels,
which take each row's two scale bytes apart with integer operations (`scale_from_bytes`).
"""

import logging

import jax
import jax.numpy as jnp

from xlaserve.quantization.int8 import FP8_DTYPE, FP8_MAX, INT8_MAX

logger = logging.getLogger(__name__)

SCALE_ELEMENTS = 2
STORAGE = {"int8": "int8", "fp8": "float8_e4m3fn"}  # kv_cache_dtype -> cache dtype name


def is_quantized_kv(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(FP8_DTYPE))


def kv_cache_storage(kv_cache_dtype: str, default: str):
    """(cache dtype name, scale elements per head row) for EngineArgs.kv_cache_dtype; `default`
    is the cache dtype of "auto"."""
    if kv_cache_dtype == "auto":
        return default, 0
    if kv_cache_dtype == "fp8" and jax.default_backend() == "cpu":
        logger.warning(
            "kv_cache_dtype 'fp8' on the CPU: XLA converts float8 element by element here; "
            "decode measured ~40x slower than kv_cache_dtype 'int8' (same pages per GB)"
        )
    return STORAGE[kv_cache_dtype], SCALE_ELEMENTS


def quantize_kv(new_kv: jax.Array, dtype) -> jax.Array:
    """new_kv [T, 2K, H] -> [T, 2K, H + SCALE_ELEMENTS] in the cache's 8-bit dtype."""
    dtype = jnp.dtype(dtype)
    x = new_kv.astype(jnp.float32)
    qmax = INT8_MAX if dtype == jnp.dtype(jnp.int8) else FP8_MAX
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)  # [T, 2K, 1]
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.bfloat16)
    scaled = jnp.clip(x / scale.astype(jnp.float32), -qmax, qmax)
    if dtype == jnp.dtype(jnp.int8):
        scaled = jnp.round(scaled)
    scale_bits = jax.lax.bitcast_convert_type(scale[..., 0], dtype)  # [T, 2K, 2]
    return jnp.concatenate([scaled.astype(dtype), scale_bits], axis=-1)


def scale_from_bytes(low: jax.Array, high: jax.Array) -> jax.Array:
    """f32 scales from the two 8-bit elements ending each stored row (`low` first, as the
    little-endian bit-cast in `quantize_kv` lays them): the bfloat16 bits put together with
    integer operations, which the kernels lower where 8-to-16-bit bit-casts do not."""
    if low.dtype != jnp.int8:  # float8 elements: their bits
        low = jax.lax.bitcast_convert_type(low, jnp.int8)
        high = jax.lax.bitcast_convert_type(high, jnp.int8)
    bits = (low.astype(jnp.int32) & 0xFF) | ((high.astype(jnp.int32) & 0xFF) << 8)
    return jax.lax.bitcast_convert_type(bits << 16, jnp.float32)


def dequantize_kv(stored: jax.Array, head_dim: int) -> jax.Array:
    """f32 [..., H] from stored rows [..., H + SCALE_ELEMENTS]."""
    scale = jax.lax.bitcast_convert_type(stored[..., head_dim:], jnp.bfloat16)  # [...]
    return stored[..., :head_dim].astype(jnp.float32) * scale.astype(jnp.float32)[..., None]
