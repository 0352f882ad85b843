"""GGUF quantized blocks dequantized with jnp, value for value like gguf-py's
`gguf.quants.dequantize` (same float32 operations in the same order).

`dequantize_rows(raw, qtype)` takes rows of packed blocks uint8 [..., rows, row_bytes] (a
GGUF tensor's own layout: each row is one output channel, blocks run along the input axis)
and returns float32 [..., rows, row_bytes / type_size * block_size].

Layouts (bytes per block; d, m, dmin are float16 little-endian):
  Q8_0  (32 values, 34 B): d, 32 x int8                         -> d * q
  Q4_0  (32 values, 18 B): d, 16 B of nibbles (low: 0-15, high: 16-31) -> d * (q - 8)
  Q4_1  (32 values, 20 B): d, m, 16 B of nibbles                 -> d * q + m
  Q5_0  (32 values, 22 B): d, 4 B of high bits (bit i: value i), 16 B of nibbles as Q4_0
                                                                  -> d * (q - 16)
  Q4_K  (256 values, 144 B): d, dmin, 12 B of 6-bit scales/mins, 128 B of nibbles; eight
        sub-blocks of 32                                          -> d * sc * q - dmin * mn
  Q6_K  (256 values, 210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 x int8 scales, d;
        sixteen sub-blocks of 16                                  -> d * sc * (q - 32)
"""

import gguf
import jax
import jax.numpy as jnp

T = gguf.GGMLQuantizationType
PACKED_TYPES = {
    T.Q8_0: "Q8_0", T.Q4_0: "Q4_0", T.Q4_1: "Q4_1", T.Q5_0: "Q5_0", T.Q4_K: "Q4_K",
    T.Q6_K: "Q6_K",
}  # fmt: skip


def block_shape(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a packed type."""
    return gguf.GGML_QUANT_SIZES[T(qtype)]


def _f16(two_bytes: jax.Array) -> jax.Array:
    """float32 [...] from little-endian float16 bytes uint8 [..., 2]."""
    u16 = two_bytes[..., 0].astype(jnp.uint16) | (two_bytes[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u16, jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array, group: int) -> jax.Array:
    """uint8 [..., n, group] -> [..., n, 2, group]: low nibbles, then high nibbles."""
    return jnp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _q8_0(b: jax.Array) -> jax.Array:  # b: [..., 34]
    d = _f16(b[..., 0:2])[..., None]
    q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return q * d


def _q4_0(b: jax.Array) -> jax.Array:  # b: [..., 18]
    d = _f16(b[..., 0:2])[..., None]
    q = _nibbles(b[..., 2:], 16).reshape(*b.shape[:-1], 32).astype(jnp.int8) - jnp.int8(8)
    return d * q.astype(jnp.float32)


def _q4_1(b: jax.Array) -> jax.Array:  # b: [..., 20]
    d, m = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    q = _nibbles(b[..., 4:], 16).reshape(*b.shape[:-1], 32).astype(jnp.float32)
    return d * q + m


def _q5_0(b: jax.Array) -> jax.Array:  # b: [..., 22]
    d = _f16(b[..., 0:2])[..., None]
    qh = b[..., 2:6].astype(jnp.uint32)
    qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    high = ((qh[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.uint8)
    low = _nibbles(b[..., 6:], 16).reshape(*b.shape[:-1], 32)
    q = (low | (high << 4)).astype(jnp.int8) - jnp.int8(16)
    return d * q.astype(jnp.float32)


def _k_scale_min(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K's eight 6-bit scales and mins from their 12 packed bytes [..., 12]."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn  # [..., 8] each


def _q4_k(b: jax.Array) -> jax.Array:  # b: [..., 144]
    lead = b.shape[:-1]
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    d = (d * sc.astype(jnp.float32))[..., None]  # [..., 8, 1]
    dm = (dmin * mn.astype(jnp.float32))[..., None]
    qs = b[..., 16:].reshape(*lead, 4, 32)
    q = _nibbles(qs, 32).reshape(*lead, 8, 32).astype(jnp.float32)
    return (d * q - dm).reshape(*lead, 256)


def _q6_k(b: jax.Array) -> jax.Array:  # b: [..., 210]
    lead = b.shape[:-1]
    ql, qh = b[..., 0:128], b[..., 128:192]
    scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16(b[..., 208:210])[..., None] * scales)[..., None]  # [..., 16, 1]
    low = _nibbles(ql.reshape(*lead, 2, 64), 64).reshape(*lead, 8, 32)
    shifts = jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
    high = ((qh.reshape(*lead, 2, 1, 32) >> shifts) & 0x03).reshape(*lead, 8, 32)
    q = (low | (high << 4)).astype(jnp.int8) - jnp.int8(32)
    q = q.reshape(*lead, 16, 16).astype(jnp.float32)
    return (d * q).reshape(*lead, 256)


_DEQUANT = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q4_K: _q4_k, T.Q6_K: _q6_k,
}  # fmt: skip


def dequantize_rows(raw: jax.Array, qtype: int) -> jax.Array:
    """float32 [..., rows, in] from packed rows uint8 [..., rows, row_bytes] of `qtype`."""
    qtype = T(qtype)
    if qtype not in _DEQUANT:
        raise ValueError(f"GGUF type {qtype.name} is not kept packed; packed types: "
                         f"{sorted(PACKED_TYPES.values())}")  # fmt: skip
    values, nbytes = block_shape(qtype)
    *lead, row_bytes = raw.shape
    if row_bytes % nbytes:
        raise ValueError(f"{qtype.name} rows of {row_bytes} bytes are not whole {nbytes}-byte "
                         "blocks")  # fmt: skip
    blocks = raw.reshape(*lead, row_bytes // nbytes, nbytes)
    return _DEQUANT[qtype](blocks).reshape(*lead, row_bytes // nbytes * values)
