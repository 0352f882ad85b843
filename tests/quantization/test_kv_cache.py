"""8-bit KV cache: the stored rows, the reference attention reading them, and the pages the
same memory buys."""

import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.engine.runner_api import KVCacheSpec
from xlaserve.kernels_pallas.ragged_paged_attention import ragged_paged_attention
from xlaserve.quantization.kv_cache import (
    SCALE_ELEMENTS,
    dequantize_kv,
    kv_cache_storage,
    quantize_kv,
)

DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_rows_round_trip_within_the_format_error(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4, 16)).astype(np.float32) * rng.uniform(0.1, 20, size=(5, 4, 1))
    x[2, 1] = 0.0
    stored = quantize_kv(jnp.asarray(x), DTYPES[kind])
    assert stored.shape == (5, 4, 16 + SCALE_ELEMENTS) and stored.dtype == DTYPES[kind]
    back = np.asarray(dequantize_kv(stored, 16))
    amax = np.abs(x).max(axis=-1, keepdims=True)
    # int8: half a step of amax / 127 (+ the bfloat16 scale's rounding, 2^-9 of amax);
    # fp8 e4m3: 2^-4 relative, plus the scale's rounding.
    bound = amax * (0.5 / 127 + 2.0**-8) if kind == "int8" else np.abs(x) * 2.0**-4 + amax * 2.0**-8
    assert np.all(np.abs(back - x) <= bound + 1e-7)
    assert np.all(back[2, 1] == 0)


def _paged_case(rng, kv_lens, q_lens, page_size=4, heads=4, kv_heads=2, head_dim=16):
    pages_per_seq = 4
    num_pages = len(kv_lens) * pages_per_seq + 1
    cache = rng.normal(size=(num_pages, page_size, 2 * kv_heads, head_dim)).astype(np.float32)
    table = rng.permutation(num_pages)[: len(kv_lens) * pages_per_seq]
    table = table.reshape(len(kv_lens), pages_per_seq).astype(np.int32)
    q = rng.normal(size=(sum(q_lens), heads, head_dim)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    args = (np.asarray(kv_lens, np.int32), table, cu, np.array([len(kv_lens)], np.int32))
    return q, cache, args


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_reference_attention_reads_the_quantized_cache(kind):
    rng = np.random.default_rng(1)
    q, cache, (kv_lens, table, cu, n) = _paged_case(rng, kv_lens=[5, 13, 1], q_lens=[5, 1, 1])
    stored = quantize_kv(jnp.asarray(cache.reshape(-1, *cache.shape[2:])), DTYPES[kind])
    stored = stored.reshape(*cache.shape[:3], -1)  # [P, page_size, 2K, H + 2]
    dequantized = dequantize_kv(stored, cache.shape[-1])
    got = ragged_paged_attention(jnp.asarray(q), stored, kv_lens, table, cu, n, sm_scale=0.25,
                                 impl="reference")  # fmt: skip
    # Exactly the float attention over the dequantized cache ...
    want = ragged_paged_attention(jnp.asarray(q), dequantized, kv_lens, table, cu, n,
                                  sm_scale=0.25, impl="reference")  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # ... and close to attention over the original cache.
    exact = ragged_paged_attention(jnp.asarray(q), jnp.asarray(cache), kv_lens, table, cu, n,
                                   sm_scale=0.25, impl="reference")  # fmt: skip
    tol = 0.02 if kind == "int8" else 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(exact), atol=tol)


def test_pages_in_the_same_memory_nearly_double_against_bfloat16():
    class Config:
        num_layers, num_kv_heads, head_dim = 30, 3, 64  # SmolLM2-135M

    bf16 = KVCacheSpec.for_model(Config, page_size=16, dtype="bfloat16")
    dtype, scales = kv_cache_storage("int8", "bfloat16")
    int8 = KVCacheSpec.for_model(Config, page_size=16, dtype=dtype, scale_elements=scales)
    assert int8.shape(10) == (30, 10, 16, 6, 66)
    assert int8.page_bytes == 30 * 16 * 6 * 66
    budget = 1 << 30
    assert budget // int8.page_bytes >= 1.9 * (budget // bf16.page_bytes)
    fp8 = KVCacheSpec.for_model(Config, page_size=16, dtype="float8_e4m3fn", scale_elements=2)
    assert fp8.page_bytes == int8.page_bytes


def test_every_backend_takes_a_quantized_cache():
    assert kv_cache_storage("int8", "float32") == ("int8", SCALE_ELEMENTS)
    assert kv_cache_storage("fp8", "bfloat16") == ("float8_e4m3fn", SCALE_ELEMENTS)
    assert kv_cache_storage("auto", "bfloat16") == ("bfloat16", 0)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_attention_kernels_read_a_quantized_cache_in_interpret_mode(impl):
    rng = np.random.default_rng(2)
    q, cache, (kv_lens, table, cu, n) = _paged_case(rng, kv_lens=[5, 9], q_lens=[5, 1])
    stored = quantize_kv(jnp.asarray(cache.reshape(-1, *cache.shape[2:])), jnp.int8)
    stored = stored.reshape(*cache.shape[:3], -1)
    got = ragged_paged_attention(jnp.asarray(q), stored, kv_lens, table, cu, n, sm_scale=0.25,
                                 impl=impl, interpret=True)  # fmt: skip
    want = ragged_paged_attention(jnp.asarray(q), stored, kv_lens, table, cu, n, sm_scale=0.25,
                                  impl="reference")  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
