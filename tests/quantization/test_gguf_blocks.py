"""GGUF packed blocks dequantize in jnp exactly like gguf-py (`gguf.quants.dequantize`)."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.models.layers import linear
from xlaserve.quantization.gguf_blocks import PACKED_TYPES, block_shape, dequantize_rows
from xlaserve.quantization.linear import QuantizedWeight

T = gguf.GGMLQuantizationType
# Byte offsets of each type's float16 fields (the rest of a block is any bit pattern).
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q4_K: (0, 2),
              T.Q6_K: (208,)}  # fmt: skip


def synthetic_rows(qtype, rows: int, blocks: int, seed: int) -> np.ndarray:
    """uint8 [rows, blocks * block_bytes]: random bytes, finite random float16 scales."""
    rng = np.random.default_rng(seed)
    _, nbytes = block_shape(qtype)
    raw = rng.integers(0, 256, size=(rows, blocks, nbytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        d = rng.uniform(-0.05, 0.05, size=(rows, blocks)).astype(np.float16)
        raw[:, :, offset : offset + 2] = d.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * nbytes)


@pytest.mark.parametrize("qtype", list(PACKED_TYPES), ids=lambda t: T(t).name)
def test_dequantize_is_bit_exact_with_gguf_py(qtype):
    raw = synthetic_rows(qtype, rows=6, blocks=3, seed=int(qtype))
    want = gguf.quants.dequantize(raw, qtype)  # f32 [6, 3 * block values]
    got = np.asarray(jax.jit(dequantize_rows, static_argnums=1)(jnp.asarray(raw), qtype))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_q4_1_block_worked_by_hand():
    # d = 0.5, m = -1.0; byte j holds element j (low nibble) and element 16 + j (high nibble).
    block = np.zeros(20, np.uint8)
    block[0:2] = np.array([0.5], np.float16).view(np.uint8)
    block[2:4] = np.array([-1.0], np.float16).view(np.uint8)
    block[4] = 0x3F  # element 0 = 15, element 16 = 3
    values = np.asarray(dequantize_rows(jnp.asarray(block[None]), T.Q4_1))[0]
    assert values[0] == 0.5 * 15 - 1.0 and values[16] == 0.5 * 3 - 1.0 and values[1] == -1.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows", [1, 5])
def test_packed_matmul_equals_the_plain_linear_with_the_dequantized_weight(dtype, rows):
    raw = synthetic_rows(T.Q4_1, rows=24, blocks=2, seed=9)  # 24 output channels, in = 64
    w = jnp.asarray(gguf.quants.dequantize(raw, T.Q4_1).T, dtype)  # [in, out]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(rows, 64)), dtype)
    packed = QuantizedWeight(jnp.asarray(raw.T), None, "gguf", int(T.Q4_1))  # [row_bytes, out]
    got = np.asarray(jax.jit(linear)(x, packed), np.float32)
    want = np.asarray(jax.jit(linear)(x, w), np.float32)
    if dtype == jnp.bfloat16:  # the engine's CPU dtype: the same bits as the plain weight
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_unpacked_type_is_refused_by_name():
    with pytest.raises(ValueError, match="Q5_1 is not kept packed"):
        dequantize_rows(jnp.zeros((2, 24), jnp.uint8), T.Q5_1)
