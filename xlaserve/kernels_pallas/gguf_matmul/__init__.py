"""x @ a weight kept in GGUF packed blocks: the XLA reference (dequantize, then one dot; the
CPU's and TPU's path, and the truth) and a Pallas GPU kernel that dequantizes inside the
matmul (`gpu.py`). Contract in `reference.py`."""

import jax

from xlaserve.kernels_pallas.gguf_matmul import reference

IMPLS = ("reference", "gpu")


def gguf_matmul(
    x: jax.Array,
    packed: jax.Array,
    qtype: int,
    *,
    rows: bool = False,
    impl: str = "reference",
    interpret: bool = False,
) -> jax.Array:
    """f32 [M, N]: x [M, K] times the weight in packed GGUF blocks of `qtype`: uint8
    [row_bytes, N] (one column per output channel), or [N, row_bytes] with `rows`.
    impl: "reference" | "gpu" (the kernel; `interpret` runs it on CPU). The kernel tiles the
    output in multiples of 16 columns: other widths take the reference."""
    n = packed.shape[0] if rows else packed.shape[1]
    if impl == "reference" or (impl == "gpu" and n % 16):
        return reference.gguf_matmul(x, packed, qtype, rows=rows)
    if impl != "gpu":
        raise ValueError(f"unknown GGUF matmul implementation {impl!r}; choose from {IMPLS}")
    from xlaserve.kernels_pallas.gguf_matmul import gpu

    return gpu.gguf_matmul(x, packed, qtype, rows=rows, interpret=interpret)


__all__ = ["IMPLS", "gguf_matmul"]
