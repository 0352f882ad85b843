"""Packed bfloat16 weights and their matmul on the CPU kernel (skinny_matmul.cc).

`PackedWeight` is how a decoder projection is stored on one CPU device when the kernel is
available (see `Transformer.unstack_layers`): the [in, out] weight regrouped into panels of
16 outputs, each contiguous over `in` (with AVX512-BF16, rows interleaved in pairs for
vdpbf16ps; with AVX2, each panel row's outputs in the order 0, 8, 1, 9, ..., so that one
256-bit load widens to two vectors of eight float32 outputs with two integer ops).
`models/layers.linear` hands it the matmul, as it does a quantized weight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.kernels_cpu.build import SKINNY_MATMUL_BF16, library

PANEL = 16  # outputs per panel (one 512-bit vector of f32 partial sums)


@functools.cache
def pair_rows() -> int | None:
    """Rows of W the kernel interleaves (2 with AVX512-BF16, else 1); None when the kernel
    is not used here: not built, or built for vectors narrower than 256 bits (no AVX2)."""
    lib = library()
    if lib is None or lib.XlaserveSkinnyVectorBits() < 256:
        return None
    return int(lib.XlaserveSkinnyPairRows())


@functools.cache
def output_order() -> np.ndarray:
    """The order of a panel row's 16 outputs in memory (interleaved halves on AVX2)."""
    lib = library()
    if lib is not None and lib.XlaserveSkinnyInterleavedOutputs():
        return np.arange(PANEL).reshape(2, PANEL // 2).T.reshape(-1)  # 0, 8, 1, 9, ...
    return np.arange(PANEL)


def available() -> bool:
    """Whether bfloat16 projections are packed for the CPU kernel in this process."""
    return jax.default_backend() == "cpu" and pair_rows() is not None


def packable(w: jax.Array) -> bool:
    """A bfloat16 [in, out] weight whose shape the kernel's panels tile exactly."""
    pairs = pair_rows()
    return (
        pairs is not None
        and w.ndim == 2
        and w.dtype == jnp.bfloat16
        and w.shape[1] % PANEL == 0
        and w.shape[0] % pairs == 0
    )


def pack(w: jax.Array) -> jax.Array:
    """bf16[in, out] -> bf16[out / 16, in / pairs, 16 * pairs] (see skinny_matmul.cc)."""
    k, n = w.shape
    pairs = pair_rows()
    panels = w.reshape(k // pairs, pairs, n // PANEL, PANEL)[..., output_order()]
    return panels.transpose(2, 0, 3, 1).reshape(n // PANEL, k // pairs, PANEL * pairs)


def unpack(packed: jax.Array) -> jax.Array:
    """The [in, out] weight back from its panels (for checks and conversions)."""
    panels, rows, width = packed.shape
    pairs = width // PANEL
    w = packed.reshape(panels, rows, PANEL, pairs).transpose(1, 3, 0, 2)
    w = w[..., np.argsort(output_order())]
    return w.reshape(rows * pairs, panels * PANEL)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PackedWeight:
    """A projection in the kernel's panel layout: values bf16[out / 16, in / pairs, 16 * pairs]."""

    values: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        panels, rows, width = self.values.shape
        return rows * width // PANEL, panels * PANEL

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [M, in] @ self -> [M, out] in x's dtype, accumulated in float32."""
        out = jax.ffi.ffi_call(
            SKINNY_MATMUL_BF16, jax.ShapeDtypeStruct((x.shape[0], self.shape[1]), jnp.float32)
        )(x.astype(jnp.bfloat16), self.values)
        return out.astype(x.dtype)


def bind_packed(p: dict, names: tuple[str, ...]) -> dict:
    """One layer's parameters with each packed projection as a `PackedWeight`."""
    if not names:
        return p
    return {name: PackedWeight(v) if name in names else v for name, v in p.items()}
