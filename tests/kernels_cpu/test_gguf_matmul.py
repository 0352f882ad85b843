"""The CPU GGUF block matmuls against the dequantized weight, every packed type, 1-33 rows:
gguf_matmul.cc with the weight's values exactly as gguf_blocks.py gives them (rounded to
bfloat16), only the float32 summation order free; gguf_matmul_a8.cc (int8 activations) against
x's int8 runs times those values."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.quantization.test_gguf_blocks import synthetic_rows
from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu import skinny
from xlaserve.kernels_pallas.gguf_matmul import gguf_matmul
from xlaserve.quantization.gguf_blocks import PACKED_TYPES, block_shape, dequantize_rows
from xlaserve.quantization.int8 import dequantize_blocks, quantize_blocks
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


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 33])
@pytest.mark.parametrize("qtype", list(PACKED_TYPES), ids=lambda t: T(t).name)
def test_int8_activation_kernel_equals_its_reference(qtype, rows):
    """quantization="gguf_a8": x quantized per 32 values, integer dots with the quants. The
    kernel's product equals x's int8 runs (dequantized in float64) times the block values, up
    to float32 sums; its x quantization is the reference's (quantize_blocks), or a run's
    values would differ by a whole step of its scale, far past the bound."""
    values, _ = block_shape(qtype)
    blocks = max(2, 512 // values)
    raw = synthetic_rows(qtype, rows=40, blocks=blocks, seed=int(qtype) + 7 * rows)
    k = blocks * values
    x = np.random.default_rng(rows).normal(size=(rows, k)) * np.linspace(0.01, 4, k)
    x[0, :32] = 0.0  # an all-zero run: scale 0
    x = jnp.asarray(x, jnp.bfloat16)
    matmul = jax.jit(gguf_kernel.matmul, static_argnums=(2, 3))
    got = np.asarray(matmul(x, jnp.asarray(raw), qtype, True), np.float64)
    q, scale = quantize_blocks(x)
    xs = np.asarray(dequantize_blocks(q, scale), np.float64)
    w = np.asarray(dequantize_rows(jnp.asarray(raw), qtype), np.float64)
    want, bound = xs @ w.T, np.abs(xs) @ np.abs(w.T)
    assert got.shape == (rows, 40)
    assert np.all(np.abs(got - want) <= 2 * k * 2**-24 * bound + 1e-30)
    reference = gguf_matmul(x, jnp.asarray(raw), qtype, rows=True, int8_activations=True)
    np.testing.assert_allclose(np.asarray(reference), want, rtol=0, atol=1e-4 * bound.max())
    exact = np.asarray(x, np.float64) @ w.T  # int8 activations move the product, a little
    assert 0 < np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


def test_activation_runs_quantize_to_nearest_even_steps():
    run = np.zeros(32, np.float32)
    run[:6] = [127.0, -63.5, 0.5, 1.5, -2.5, 126.49]  # amax 127: the step is exactly 1
    x = jnp.asarray(np.stack([run, run * 0.25, np.zeros(32, np.float32)]))
    q, scale = quantize_blocks(x)
    np.testing.assert_array_equal(np.asarray(q)[0, :6], [127, -64, 0, 2, -2, 126])
    np.testing.assert_array_equal(np.asarray(q)[1], np.asarray(q)[0])  # scale-free
    np.testing.assert_allclose(np.asarray(scale)[:, 0], [1.0, 0.25, 0.0])
    assert not np.asarray(q)[2].any()
    xs = np.asarray(dequantize_blocks(q, scale))
    assert np.all(np.abs(xs - np.asarray(x)) <= np.asarray(scale)[:, :1] / 2 + 1e-7)


@pytest.mark.parametrize("k", [64, 512, 576])  # 576: 18 blocks, the last pair past 8-block groups
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1], ids=lambda t: T(t).name)
def test_planar_rows_give_the_block_rows_product(qtype, rows, k):
    # gguf_a8's Q4_0 / Q4_1 projections are laid out by planar_rows for the kernel's 8-block
    # path; the same bytes in GGUF's block order take the block-by-block path.
    raw = synthetic_rows(qtype, rows=24, blocks=k // 32, seed=k + rows)
    x = jnp.asarray(np.random.default_rng(k).normal(size=(rows, k)), jnp.bfloat16)
    planar = gguf_kernel.planar_rows(raw, qtype)
    assert planar.shape == raw.shape and sorted(planar[0]) == sorted(raw[0])
    assert gguf_kernel.planar(qtype, k) and not gguf_kernel.planar(qtype, 96)
    matmul = jax.jit(gguf_kernel.matmul, static_argnums=(2, 3, 4))
    blocks = np.asarray(matmul(x, jnp.asarray(raw), qtype, True, False), np.float64)
    got = np.asarray(matmul(x, jnp.asarray(planar), qtype, True, True), np.float64)
    xs = np.asarray(dequantize_blocks(*quantize_blocks(x)), np.float64)
    w = np.asarray(dequantize_rows(jnp.asarray(raw), qtype), np.float64)
    bound = np.abs(xs) @ np.abs(w.T)
    assert np.all(np.abs(got - xs @ w.T) <= 2 * k * 2**-24 * bound + 1e-30)
    assert np.all(np.abs(got - blocks) <= 4 * k * 2**-24 * bound + 1e-30)
