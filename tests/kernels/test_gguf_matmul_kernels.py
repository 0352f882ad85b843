"""The GPU GGUF matmul kernel (dequantizing packed blocks inside the matmul) against the XLA
reference, in the Pallas interpreter on CPU and on a real GPU when one is visible."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.conftest import modes
from tests.quantization.test_gguf_blocks import synthetic_rows
from xlaserve.kernels_pallas.gguf_matmul import gguf_matmul, gpu, reference
from xlaserve.quantization.gguf_blocks import PACKED_TYPES, T, block_shape
from xlaserve.quantization.int8 import dequantize_blocks, quantize_blocks

TYPES = [pytest.param(t, id=T(t).name) for t in PACKED_TYPES]


def case(qtype, m: int, k: int, n: int, dtype: str, seed: int = 0):
    """x [m, k] and the packed weight both ways: columns [row_bytes, n] and rows [n, row_bytes]."""
    raw = synthetic_rows(qtype, n, k // block_shape(qtype)[0], seed)  # [n, row_bytes]
    x = np.random.default_rng(seed + 1).normal(size=(m, k)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(raw.T.copy()), jnp.asarray(raw)


def relative_error(got, want) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("mode", modes("gpu"))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_matches_reference(mode, qtype, m, dtype):
    # Every packed type, decode-sized and prefill-sized rows (M padded to the 16-row tile
    # inside), activations in float32 and bfloat16. The reference rounds each dequantized
    # weight to x's dtype before one float32 dot; the kernel multiplies the exact integer
    # quants and scales each sub-block's float32 dot. They differ by float32 summation order,
    # and for bfloat16 x by the reference's bfloat16 rounding of the weights.
    x, columns, rows = case(qtype, m, 512, 128, dtype)
    want = reference.gguf_matmul(x, columns, qtype)
    interpret = mode == "interpret"
    got = gpu.gguf_matmul(x, columns, qtype, interpret=interpret)
    got_rows = gpu.gguf_matmul(x, rows, qtype, rows=True, interpret=interpret)
    assert got.shape == got_rows.shape == (m, 128) and got.dtype == jnp.float32
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    assert relative_error(got, want) < tolerance
    assert relative_error(got_rows, want) < tolerance


@pytest.mark.parametrize("mode", modes("gpu"))
@pytest.mark.parametrize(
    "qtype", [pytest.param(T.Q4_1, id="Q4_1"), pytest.param(T.Q6_K, id="Q6_K")]
)
def test_int8_activations_through_the_kernel(mode, qtype):
    # quantization="gguf_a8": x's int8 runs (dequantized in float32) enter the same kernel,
    # so the GPU computes the product the CPU's integer kernel computes.
    x, columns, _ = case(qtype, 5, 512, 64, "bfloat16", seed=4)
    want = reference.gguf_matmul(dequantize_blocks(*quantize_blocks(x)), columns, qtype)
    got = gguf_matmul(x, columns, qtype, impl="gpu", interpret=mode == "interpret",
                      int8_activations=True)  # fmt: skip
    assert relative_error(got, want) < 1e-5
    assert relative_error(got, reference.gguf_matmul(x, columns, qtype)) > 1e-4  # not exact


@pytest.mark.parametrize("mode", modes("gpu"))
def test_block_sizes_and_a_wide_output(mode):
    # Several output and row tiles (grid 2 x 4), and the same product from other tile sizes.
    x, columns, _ = case(T.Q4_K, 40, 768, 256, "bfloat16", seed=3)
    want = reference.gguf_matmul(x, columns, T.Q4_K)
    interpret = mode == "interpret"
    for block_m, block_n in [(16, 64), (32, 128), (64, 16)]:
        got = gpu.gguf_matmul(
            x, columns, T.Q4_K, block_m=block_m, block_n=block_n, interpret=interpret
        )
        assert relative_error(got, want) < 1e-2, (block_m, block_n)


def test_hand_worked_q4_1_block():
    # One Q4_1 block: d = 0.5, m = -1, nibbles q_i = i % 16 -> weight_i = 0.5 * q_i - 1.
    block = np.zeros(20, np.uint8)
    block[0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    block[2:4] = np.frombuffer(np.float16(-1.0).tobytes(), np.uint8)
    q = np.arange(32) % 16
    block[4:] = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    packed = jnp.asarray(np.tile(block[:, None], (1, 16)))  # 16 identical output channels
    x = jnp.ones((1, 32), jnp.float32)
    got = gpu.gguf_matmul(x, packed, T.Q4_1, block_n=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.full((1, 16), (0.5 * q - 1).sum()))


def test_kernel_lowers_for_the_gpu():
    # Pallas -> Triton IR on the CPU host, every type and both layouts: catches primitives
    # Triton cannot lower (which the interpreter accepts).
    for qtype in PACKED_TYPES:
        x, columns, rows = case(qtype, 3, 256, 64, "bfloat16")
        for packed, as_rows in ((columns, False), (rows, True)):
            fn = jax.jit(functools.partial(gpu.gguf_matmul, qtype=qtype, rows=as_rows))
            lowered = fn.trace(x, packed).lower(lowering_platforms=("cuda",))
            assert "xlaserve_gguf_matmul" in lowered.as_text()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, w: gpu.gguf_matmul(x, w, T.Q5_1), "Q5_1"),
        (lambda x, w: gpu.gguf_matmul(x.astype(jnp.int32), w, T.Q4_1), "int32"),
        (lambda x, w: gpu.gguf_matmul(x[:, :64], w, T.Q4_1), "64 input values"),
        (lambda x, w: gpu.gguf_matmul(x, w, T.Q4_1, block_n=24), "block_n"),
        (lambda x, w: gpu.gguf_matmul(x, w, T.Q4_1, block_n=128), "multiple of block_n"),
        (lambda x, w: gguf_matmul(x, w, T.Q4_1, impl="cuda"), "'cuda'"),
    ],
)
def test_bad_arguments_raise_value_errors(call, match):
    x, columns, _ = case(T.Q4_1, 2, 128, 64, "float32")
    with pytest.raises(ValueError, match=match):
        call(x, columns)


@pytest.mark.parametrize("mode", modes("gpu"))
def test_smollm2_packed_greedy_tokens_through_the_gpu_kernels(mode, smollm2_gguf):
    # The bundled Q4_1 model with its Q8_0 head kept packed, bfloat16: the GPU backend's
    # projections and LM head (this kernel, rows layout for the head) and attention give the
    # reference backend's greedy tokens, prefill and decode.
    if mode == "interpret" and jax.default_backend() != "cpu":
        pytest.skip("interpret mode is the CPU-host variant; 'device' covers this platform")
    from flax import nnx

    from xlaserve.checkpoints.loader import load_model
    from xlaserve.models.generate import greedy_generate

    loaded = load_model(str(smollm2_gguf), dtype="bfloat16", quantization="gguf")
    assert loaded.model.lm_head_rows is not None  # the head is read packed too
    prompts = [
        loaded.tokenizer(p)["input_ids"]
        for p in ("The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,")
    ]

    def generate(backend: str) -> list[list[int]]:
        model = nnx.merge(*nnx.split(loaded.model))  # same weights, own static attributes
        model.attention_backend = backend
        return greedy_generate(model, prompts, 8)

    assert generate("gpu") == generate("reference")


def test_output_widths_the_kernel_cannot_tile_take_the_reference():
    # 24 output channels (not a multiple of 16): the entry point answers with the reference.
    x, columns, rows = case(T.Q8_0, 3, 64, 24, "float32")
    want = reference.gguf_matmul(x, columns, T.Q8_0)
    got = gguf_matmul(x, columns, T.Q8_0, impl="gpu", interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got_rows = gguf_matmul(x, rows, T.Q8_0, rows=True, impl="gpu", interpret=True)
    np.testing.assert_allclose(np.asarray(got_rows), np.asarray(want), rtol=1e-6, atol=1e-6)
