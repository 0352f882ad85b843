"""The CPU GGUF block matmul (xlaserve/kernels_cpu/gguf_matmul.cc) against the dequantized
weight: every packed type, 1-33 rows, the weight's values exactly as gguf_blocks.py gives
them (rounded to bfloat16), only the float32 summation order free."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.quantization.test_gguf_blocks import synthetic_rows
from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu import skinny
from xlaserve.quantization.gguf_blocks import PACKED_TYPES, block_shape, dequantize_rows
from xlaserve.quantization.linear import QuantizedWeight

T = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(
    not skinny.available(),
    reason="the CPU kernels are not used on this machine (no C++ compiler, or no AVX2)",
)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("qtype", list(PACKED_TYPES), ids=lambda t: T(t).name)
def test_kernel_equals_the_dequantized_weight(qtype, rows):
    assert gguf_kernel.supports(qtype)
    values, _ = block_shape(qtype)
    blocks = max(1, 512 // values)
    raw = synthetic_rows(qtype, rows=48, blocks=blocks, seed=int(qtype) + rows)  # 48 outputs
    k = blocks * values
    x = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, k)), jnp.bfloat16)
    got = np.asarray(jax.jit(gguf_kernel.matmul, static_argnums=2)(x, jnp.asarray(raw), qtype))
    w = np.asarray(dequantize_rows(jnp.asarray(raw), qtype).astype(jnp.bfloat16), np.float64)
    xs = np.asarray(x, np.float64)
    exact, bound = xs @ w.T, np.abs(xs) @ np.abs(w.T)
    assert got.shape == (rows, 48)
    assert np.all(np.abs(got - exact) <= 4 * k * 2**-24 * bound + 1e-30)


def test_quantized_weight_in_the_kernel_layout_runs_the_kernel():
    raw = synthetic_rows(T.Q4_1, rows=32, blocks=2, seed=3)  # 32 outputs, in = 64
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 64)), jnp.bfloat16)
    by_rows = QuantizedWeight(jnp.asarray(raw), None, "gguf", int(T.Q4_1), kernel_layout=True)
    by_columns = QuantizedWeight(jnp.asarray(raw.T), None, "gguf", int(T.Q4_1))
    got = np.asarray(jax.jit(lambda w: w.matmul(x))(by_rows), np.float32)
    want = np.asarray(jax.jit(lambda w: w.matmul(x))(by_columns), np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # one bfloat16 rounding apart


def test_unsupported_type_is_not_sent_to_the_kernel():
    assert not gguf_kernel.supports(int(T.Q5_1))
