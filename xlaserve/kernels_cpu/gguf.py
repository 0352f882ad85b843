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


def matmul(
    x: jax.Array, rows: jax.Array, qtype: int, int8_activations: bool = False
) -> jax.Array:
    """x [M, in] @ the GGUF rows uint8[out, row_bytes] -> f32 [M, out], x rounded to
    bfloat16 first. Exact (default): dequantized weights rounded to bfloat16, products summed
    in float32. int8_activations: x quantized per 32 values (quantization/int8.quantize_blocks),
    integer dots with the blocks' quants, scaled in float32."""
    target = GGUF_MATMUL_A8 if int8_activations else GGUF_MATMUL
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct((x.shape[0], rows.shape[0]), jnp.float32)
    )(x.astype(jnp.bfloat16), rows, qtype=np.int32(qtype))
