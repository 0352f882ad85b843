"""x @ a weight kept in GGUF packed blocks: the XLA reference (dequantize, then one dot; the
CPU's and TPU's path, and the truth) and a Pallas GPU kernel that dequantizes inside the
matmul (`gpu.py`). Contract in `reference.py`."""

import jax

from xlaserve.kernels_pallas.gguf_matmul import reference
from xlaserve.quantization.int8 import dequantize_blocks, quantize_blocks

IMPLS = ("reference", "gpu")


def gguf_matmul(
    x: jax.Array,
    packed: jax.Array,
    qtype: int,
    *,
    rows: bool = False,
    impl: str = "reference",
    interpret: bool = False,
    int8_activations: bool = False,
) -> jax.Array:
    """f32 [M, N]: x [M, K] times the weight in packed GGUF blocks of `qtype`: uint8
    [row_bytes, N] (one column per output channel), or [N, row_bytes] with `rows`.
    impl: "reference" | "gpu" (the kernel; `interpret` runs it on CPU). The kernel tiles the
    output in multiples of 16 columns: other widths take the reference.
    int8_activations: x is first quantized to int8 per run of 32 values and dequantized in
    float32 (quantization/int8.quantize_blocks), the product of quantization="gguf_a8" that
    the CPU kernel computes with integer dots."""
    if int8_activations:
        x = dequantize_blocks(*quantize_blocks(x))
    n = packed.shape[0] if rows else packed.shape[1]
    if impl == "reference" or (impl == "gpu" and n % 16):
        return reference.gguf_matmul(x, packed, qtype, rows=rows)
    if impl != "gpu":
        raise ValueError(f"unknown GGUF matmul implementation {impl!r}; choose from {IMPLS}")
    from xlaserve.kernels_pallas.gguf_matmul import gpu

    return gpu.gguf_matmul(x, packed, qtype, rows=rows, interpret=interpret)


__all__ = ["IMPLS", "gguf_matmul"]
