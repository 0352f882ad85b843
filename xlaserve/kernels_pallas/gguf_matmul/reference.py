"""The GGUF packed-block matmul in plain jnp: the blocks dequantized like gguf-py
(quantization/gguf_blocks.py), in x's dtype, then one dot accumulated in float32.

Contract: x [M, K] (float32 / bfloat16), packed uint8 [row_bytes, N] with the blocks of each
output channel running down its column (a GGUF tensor's rows, transposed), or uint8
[N, row_bytes] (the GGUF tensor as stored) with `rows`; row_bytes = K / block values * block
bytes. Returns float32 [M, N].
"""

import jax
import jax.numpy as jnp

from xlaserve.quantization.gguf_blocks import dequantize_rows


def gguf_matmul(x: jax.Array, packed: jax.Array, qtype: int, *, rows: bool = False) -> jax.Array:
    # Rows of blocks dequantize to [N, K]; contracting K on both sides is the product XLA's
    # CPU backend computes for a plain [K, N] weight, bit for bit (a transposed [K, N] copy
    # is summed in another order).
    w = dequantize_rows(packed if rows else packed.T, qtype).astype(x.dtype)  # [N, K]
    two = jnp.concatenate([x, x]) if x.shape[0] == 1 else x  # see layers.at_least_two_rows
    # float32 x (gguf_a8's dequantized int8 runs): full float32 products on every backend.
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = jax.lax.dot_general(
        two, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    return out[: x.shape[0]]
