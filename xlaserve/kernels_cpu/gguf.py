"""The GGUF block matmuls on the CPU kernels: gguf_matmul.cc for quantization="gguf",
gguf_matmul_a8.cc (activations quantized to int8 per 32 values) for "gguf_a8".

The kernel reads a GGUF tensor's own rows (uint8[out, row_bytes]); `pack.pack_for_cpu_kernel`
turns the packed projections into that layout where the kernel runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.kernels_cpu.build import GGUF_MATMUL, GGUF_MATMUL_A8
from xlaserve.kernels_cpu.skinny import available

# ggml type ids the kernel dequantizes (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K).
KERNEL_TYPES = (8, 2, 3, 6, 12, 14)


def supports(qtype: int) -> bool:
    return available() and int(qtype) in KERNEL_TYPES


# Types whose rows the int8-activation kernel reads planar (see planar_rows).
PLANAR_TYPES = (2, 3)  # Q4_0, Q4_1


def planar(qtype: int, in_features: int) -> bool:
    """Whether a gguf_a8 projection of `qtype` over `in_features` inputs is laid out by
    `planar_rows` for the kernel (pairs of 32-value blocks need in_features % 64 == 0)."""
    return int(qtype) in PLANAR_TYPES and in_features % 64 == 0


def planar_rows(rows: np.ndarray, qtype: int) -> np.ndarray:
    """GGUF rows uint8 [..., out, row_bytes] of Q4_0 / Q4_1 reordered, row by row, into all
    blocks' 16 bytes of nibbles, then their float16 d, then (Q4_1) their m: the same bytes,
    which the int8-activation kernel reads 8 blocks at a time (2 blocks' nibbles per 32-byte
    load, 8 scales per conversion)."""
    values, nbytes = {2: (32, 18), 3: (32, 20)}[int(qtype)]
    *lead, row_bytes = rows.shape
    blocks = rows.reshape(*lead, row_bytes // nbytes, nbytes)
    scales = 4 if int(qtype) == 3 else 2
    parts = [blocks[..., scales:], blocks[..., 0:2]]
    if int(qtype) == 3:
        parts.append(blocks[..., 2:4])
    flat = [part.reshape(*lead, -1) for part in parts]
    return np.ascontiguousarray(np.concatenate(flat, axis=-1))


def matmul(
    x: jax.Array,
    rows: jax.Array,
    qtype: int,
    int8_activations: bool = False,
    planar_layout: bool = False,
) -> jax.Array:
    """x [M, in] @ the GGUF rows uint8[out, row_bytes] -> f32 [M, out], x rounded to
    bfloat16 first. Exact (default): dequantized weights rounded to bfloat16, products summed
    in float32. int8_activations: x quantized per 32 values (quantization/int8.quantize_blocks),
    integer dots with the blocks' quants, scaled in float32; planar_layout: the rows come from
    `planar_rows`."""
    shape = jax.ShapeDtypeStruct((x.shape[0], rows.shape[0]), jnp.float32)
    if not int8_activations:
        return jax.ffi.ffi_call(GGUF_MATMUL, shape)(
            x.astype(jnp.bfloat16), rows, qtype=np.int32(qtype)
        )
    return jax.ffi.ffi_call(GGUF_MATMUL_A8, shape)(
        x.astype(jnp.bfloat16), rows, qtype=np.int32(qtype), planar=bool(planar_layout)
    )
