"""The grouped LoRA matmul: the reference on a case worked out by hand, then the Pallas kernel
(in its interpreter on CPU) against the reference over ragged slot mixes."""

import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.kernels_pallas.lora import lora_delta, pallas, reference, resolve_impl


def test_reference_by_hand():
    # Two stored slots (token slots 1 and 2; 0 = no adapter), rank 1, I = O = 2.
    # slot 1: A = [[1], [2]], B = [[1, 0]] -> x @ A @ B = (x0 + 2 x1, 0)
    # slot 2: A = [[0], [1]], B = [[0, 3]] -> (0, 3 x1)
    a = np.zeros((2, 2, 1), np.float32)
    a[:, 0, 0], a[:, 1, 0] = [1, 2], [0, 1]
    b = np.zeros((2, 1, 2), np.float32)
    b[0, 0], b[1, 0] = [1, 0], [0, 3]
    x = np.array([[1, 1], [1, 1], [2, 5], [4, 4]], np.float32)
    slots = np.array([1, 2, 0, 1], np.int32)
    want = [[3, 0], [0, 3], [0, 0], [12, 0]]
    np.testing.assert_array_equal(reference.lora_delta(x, a, b, slots), want)


def random_case(T, I, S, R, O, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, I)).astype(np.float32)
    a = rng.standard_normal((I, S, R)).astype(np.float32)
    b = rng.standard_normal((S, R, O)).astype(np.float32)
    slots = rng.integers(0, S + 1, T).astype(np.int32)  # 0: no adapter, s: stored slot s - 1
    return (jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype),
            jnp.asarray(slots))  # fmt: skip


def test_reference_equals_per_token_products():
    x, a, b, slots = random_case(9, 12, 4, 3, 10, jnp.float32)
    want = np.stack([np.asarray(x[t] @ a[:, s - 1] @ b[s - 1]) if s else np.zeros(10)
                     for t, s in enumerate(np.asarray(slots))])  # fmt: skip
    assert 0 in np.asarray(slots)
    np.testing.assert_allclose(reference.lora_delta(x, a, b, slots), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "T,I,S,R,O,dtype",
    [
        (32, 64, 5, 8, 256, jnp.float32),  # several token and output blocks
        (1, 48, 3, 16, 40, jnp.float32),  # one token; O not a power of two
        (16, 32, 9, 4, 128, jnp.bfloat16),
        (24, 16, 2, 2, 48, jnp.float32),  # T not a multiple of the token block
    ],
)
def test_pallas_kernel_equals_reference(T, I, S, R, O, dtype):
    x, a, b, slots = random_case(T, I, S, R, O, dtype, seed=T + O)
    want = reference.lora_delta(x, a, b, slots)
    got = pallas.lora_delta(x, a, b, slots, interpret=True)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_kernel_with_only_the_empty_slot_and_all_one_slot():
    x, a, b, _ = random_case(16, 32, 4, 4, 64, jnp.float32)
    zero = jnp.zeros(16, jnp.int32)
    assert not np.asarray(pallas.lora_delta(x, a, b, zero, interpret=True)).any()
    four = jnp.full(16, 4, jnp.int32)  # the last stored slot
    np.testing.assert_allclose(pallas.lora_delta(x, a, b, four, interpret=True),
                               np.asarray(x @ a[:, 3] @ b[3]), rtol=1e-4, atol=1e-4)  # fmt: skip


def test_shapes_are_checked_and_impls_resolved():
    x, a, b, slots = random_case(4, 8, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="shapes do not agree"):
        lora_delta(x, a, b[:, :1], slots, impl="reference")
    assert resolve_impl("auto", "cpu") == "reference"
    assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "pallas"
    with pytest.raises(ValueError, match="unknown LoRA implementation"):
        resolve_impl("cuda")
