"""Packed bfloat16 weights and their matmul on the CPU kernel (skinny_matmul.cc).

`PackedWeight` is how a decoder projection is stored on one CPU device when the kernel is
available (see `Transformer.unstack_layers`): the [in, out] weight regrouped into panels of
16 outputs, each contiguous over `in` (with AVX512-BF16, rows interleaved in pairs for
vdpbf16ps; with AVX2, each panel row's outputs in the order 0, 8, 1, 9, ..., so that one
256-bit load widens to two vectors of eight float32 outputs with two integer ops).
`models/layers.linear` hands it the matmul, as it does a quantized weight. Prefill chunks of
256 rows and more go to XLA's dot instead on CPUs with AMX (`xla_min_rows`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.kernels_cpu import build
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


# Rows from which a packed projection runs as XLA's dot (its panels laid out back to [in, out]
# in the graph) on CPUs with AMX: there oneDNN's bfloat16 GEMM runs on the tile unit (1.56
# TFLOP/s on a 2-core Xeon against ~0.2 for the kernel's row groups), which pays for the
# per-call re-layout of the weights from ~256 rows (576 x 3072 weight, 2-core Xeon: kernel /
# XLA 0.59 / 1.98 ms at 32 rows, 2.3 / 2.3 ms at 128, 4.5 / 2.7 ms at 256). Decode batches
# stay on the kernel; without AMX every row count does (XLA's bfloat16 dot is no faster there).
AMX_XLA_MIN_ROWS = 256


@functools.cache
def xla_min_rows(cpu_flags: frozenset[str] | None = None) -> int:
    """The row count from which `PackedWeight.matmul` uses XLA's dot (huge: never)."""
    flags = build.cpu_flags() if cpu_flags is None else cpu_flags
    return AMX_XLA_MIN_ROWS if "amx_bf16" in flags else 2**62


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
        if x.shape[0] >= xla_min_rows():  # a prefill chunk on an AMX CPU: XLA's GEMM
            w = unpack(self.values)  # laid out [in, out] in the graph (one copy per call)
            out = jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
            return out.astype(x.dtype)
        out = jax.ffi.ffi_call(
            SKINNY_MATMUL_BF16, jax.ShapeDtypeStruct((x.shape[0], self.shape[1]), jnp.float32)
        )(x.astype(jnp.bfloat16), self.values)
        return out.astype(x.dtype)


def bind_packed(p: dict, names: tuple[str, ...]) -> dict:
    """One layer's parameters with each packed projection as a `PackedWeight`."""
    if not names:
        return p
    return {name: PackedWeight(v) if name in names else v for name, v in p.items()}
