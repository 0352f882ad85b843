"""The int8 matmuls on the CPU kernel (int8_matmul.cc), for quantization="int8" and "w8a8".

Projections are packed once at load (`pack.pack_for_cpu_kernel`) into panels of 16 output
channels, each contiguous over `in`, with the run of `in` one 32-bit lane consumes
interleaved: 4 bytes for w8a8 (vpdpbusd), 2 values for int8 weight-only (vdpbf16ps after an
exact widening to bfloat16). A quantized LM head keeps its rows (int8[vocab, in], the
embedding table's own layout) and runs on the row kernel.

Scales stay outside the kernels: they return the unscaled products, and `QuantizedWeight`
applies the scales exactly as its XLA path does (for w8a8 the int32 sums are the same bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xlaserve.kernels_cpu.build import (
    INT8_PANELS_W8A8,
    INT8_PANELS_W8A16,
    INT8_ROWS_W8A16,
    library,
)
from xlaserve.kernels_cpu.skinny import available as packed_kernels_available

PANEL = 16  # output channels per panel
LANES = {"w8a8": 4, "int8": 2}  # values of `in` per 32-bit lane, by method


@functools.cache
def _built() -> bool:
    lib = library()
    return lib is not None and bool(lib.XlaserveInt8KernelsBuilt())


def available() -> bool:
    """Whether int8 weights run on the kernels in this process (AVX512-BF16 and VNNI)."""
    return packed_kernels_available() and _built()


def packable(w: jax.Array, method: str) -> bool:
    """An int8 [in, out] projection the panels tile exactly (panels go in pairs)."""
    return (
        available()
        and method in LANES
        and w.ndim == 2
        and w.dtype == jnp.int8
        and w.shape[0] % LANES[method] == 0
        and w.shape[1] % (2 * PANEL) == 0
    )


def pack(w: jax.Array, method: str) -> jax.Array:
    """int8[in, out] -> int8[out / 16, in / lanes, 16 * lanes] (see int8_matmul.cc)."""
    k, n = w.shape
    lanes = LANES[method]
    panels = w.reshape(k // lanes, lanes, n // PANEL, PANEL).transpose(2, 0, 3, 1)
    return panels.reshape(n // PANEL, k // lanes, PANEL * lanes)


def unpack(packed: jax.Array) -> jax.Array:
    """The [in, out] weight back from its panels."""
    panels, runs, width = packed.shape
    lanes = width // PANEL
    w = packed.reshape(panels, runs, PANEL, lanes).transpose(1, 3, 0, 2)
    return w.reshape(runs * lanes, panels * PANEL)


def panels_matmul(x: jax.Array, panels: jax.Array, method: str) -> jax.Array:
    """x [M, in] @ a packed projection -> [M, out] unscaled: int32 for w8a8 (x int8, exact),
    f32 for int8 weight-only (x rounded to bfloat16)."""
    out_shape = (x.shape[0], panels.shape[0] * PANEL)
    if method == "w8a8":
        call = jax.ffi.ffi_call(INT8_PANELS_W8A8, jax.ShapeDtypeStruct(out_shape, jnp.int32))
        return call(x, panels)
    call = jax.ffi.ffi_call(INT8_PANELS_W8A16, jax.ShapeDtypeStruct(out_shape, jnp.float32))
    return call(x.astype(jnp.bfloat16), panels)


def rows_supported(rows: jax.Array) -> bool:
    """int8 rows [out, in] the row kernel tiles exactly."""
    return (
        available()
        and rows.ndim == 2
        and rows.dtype == jnp.int8
        and rows.shape[0] % 4 == 0
        and rows.shape[1] % 32 == 0
    )


def rows_matmul(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x [M, in] (rounded to bfloat16) @ int8 rows [out, in]^T -> f32 [M, out], unscaled."""
    return jax.ffi.ffi_call(
        INT8_ROWS_W8A16, jax.ShapeDtypeStruct((x.shape[0], rows.shape[0]), jnp.float32)
    )(x.astype(jnp.bfloat16), rows)
