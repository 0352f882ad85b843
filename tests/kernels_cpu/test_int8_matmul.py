"""The CPU int8 kernels (xlaserve/kernels_cpu/int8_matmul.cc): w8a8 int32 sums equal XLA's
bit for bit, int8 weight-only products within float32 summation rounding, and whole quantized
models on the kernels against the same weights on XLA's matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.kernels_cpu.test_skinny_matmul import tiny
from xlaserve.kernels_cpu import int8 as int8_kernel
from xlaserve.models.generate import PagedModelRunner
from xlaserve.quantization.model import quantize_model

pytestmark = pytest.mark.skipif(
    not int8_kernel.available(),
    reason="the int8 CPU kernels need 512-bit vectors with AVX512-BF16 and AVX512-VNNI",
)
SHAPES = [(64, 32), (576, 960), (1536, 576), (68, 64)]  # (in, out)


def int8s(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(-127, 128, shape, dtype=np.int8))


@pytest.mark.parametrize("method", ["w8a8", "int8"])
def test_pack_unpack_round_trip_and_layout(method):
    w = int8s(0, (8, 64))
    packed = int8_kernel.pack(w, method)
    lanes = int8_kernel.LANES[method]
    assert packed.shape == (4, 8 // lanes, 16 * lanes)
    # Panel p, run r holds outputs 16p..16p+15, each with `lanes` consecutive inputs.
    assert packed[1, 1, lanes * 3 + 1] == w[lanes + 1, 16 + 3]
    np.testing.assert_array_equal(int8_kernel.unpack(packed), w)


def test_packable_shapes_and_dtypes():
    assert int8_kernel.packable(int8s(0, (64, 32)), "w8a8")
    assert not int8_kernel.packable(int8s(0, (64, 48)), "w8a8")  # panels go in pairs
    assert not int8_kernel.packable(int8s(0, (66, 32)), "w8a8")  # in % 4
    assert int8_kernel.packable(int8s(0, (66, 32)), "int8")  # in % 2
    assert not int8_kernel.packable(jnp.zeros((64, 32), jnp.bfloat16), "int8")
    assert not int8_kernel.packable(int8s(0, (64, 32)), "fp8")


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_w8a8_sums_equal_xlas_int32_product(shape, rows):
    w, xq = int8s(rows, shape), int8s(rows + 100, (rows, shape[0]))
    want = jax.lax.dot_general(xq, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    matmul = jax.jit(int8_kernel.panels_matmul, static_argnums=2)
    got = matmul(xq, int8_kernel.pack(w, "w8a8"), "w8a8")
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_only_products_within_float32_summation(shape, rows):
    k, n = shape
    w = int8s(rows, shape)
    x = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, k)), jnp.bfloat16)
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact, bound = xs @ ws, np.abs(xs) @ np.abs(ws)
    by_panels = jax.jit(int8_kernel.panels_matmul, static_argnums=2)(
        x, int8_kernel.pack(w, "int8"), "int8"
    )
    outs = [by_panels]
    if k % 32 == 0:
        outs.append(jax.jit(int8_kernel.rows_matmul)(x, w.T))  # the LM head's row kernel
    for got in outs:
        assert got.shape == (rows, n) and got.dtype == jnp.float32
        # int8 widens to bfloat16 exactly, products are exact in float32: only sums round.
        assert np.all(np.abs(np.asarray(got) - exact) <= 4 * k * 2**-24 * bound + 1e-30)


def param_bytes(model) -> int:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(int(x.size) * x.dtype.itemsize for x in leaves)


def quantized(preset: str, method: str, kernels: bool, monkeypatch):
    model_cls, config = tiny(preset)
    model = model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    quantize_model(model, method)
    with monkeypatch.context() as m:
        if not kernels:
            m.setattr(int8_kernel, "available", lambda: False)
        model.unstack_layers()
    return model


@pytest.mark.parametrize("method", ["w8a8", "int8"])
@pytest.mark.parametrize("preset", ["smollm2-135m", "qwen2.5-0.5b", "gemma-3-270m"])
def test_quantized_model_on_the_kernels_matches_xla(preset, method, monkeypatch):
    """Prefill and decode logits within bfloat16 rounding of the XLA path, the same greedy
    tokens (q/k/v biases for Qwen, Gemma's norms and soft caps around the projections); the
    int8 LM head (tied: the embedding table's rows) runs on the row kernel."""
    plain = quantized(preset, method, False, monkeypatch)
    packed = quantized(preset, method, True, monkeypatch)
    assert packed.quant.kernel_layout and not plain.quant.kernel_layout
    assert packed.layers[0].wqkv[...].ndim == 3  # in the kernel's panels
    head = packed.embed if packed.config.tie_word_embeddings else packed.lm_head
    assert int8_kernel.rows_supported(head[...])
    assert param_bytes(packed) == param_bytes(plain)  # a new layout, not a copy
    runs = [PagedModelRunner(m, num_seqs=2, max_len=64) for m in (plain, packed)]
    new = [[5, 17, 42, 7, 99, 3], [200, 11]]
    for _ in range(6):
        outs = [r.step(new) for r in runs]
        a, b = outs[0].logits, outs[1].logits
        np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max(), rtol=0)
        picked = [np.argmax(o.logits, axis=-1) for o in outs]
        np.testing.assert_array_equal(picked[1], picked[0])
        new = [[int(t)] for t in picked[0]]


def test_fp8_keeps_xlas_matmul():
    model_cls, config = tiny("smollm2-135m")
    model = model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    quantize_model(model, "fp8")
    model.unstack_layers()
    assert not model.quant.kernel_layout
    assert model.layers[0].wqkv[...].ndim == 2
