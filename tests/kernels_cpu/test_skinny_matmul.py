"""The CPU skinny-matmul kernel (xlaserve/kernels_cpu): packing, the product against XLA's at
every row count, and whole models with packed projections against the same weights unpacked."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xlaserve.kernels_cpu import skinny
from xlaserve.models.generate import PagedModelRunner
from xlaserve.models.registry import preset_config

pytestmark = pytest.mark.skipif(
    not skinny.available(),
    reason="the CPU kernel is not used on this machine (no C++ compiler, or no AVX2)",
)


def bf16(key, shape, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(key), shape)).astype(jnp.bfloat16)


def test_pack_unpack_round_trip_and_layout():
    w = bf16(0, (64, 48))
    packed = skinny.pack(w)
    pairs = skinny.pair_rows()
    assert packed.shape == (48 // 16, 64 // pairs, 16 * pairs)
    np.testing.assert_array_equal(np.asarray(skinny.unpack(packed)), np.asarray(w))
    # Panel p holds outputs 16p..16p+15 (in output_order: 0, 8, 1, 9, ... on AVX2); each row
    # of it holds `pairs` consecutive inputs.
    order = skinny.output_order()
    assert sorted(order.tolist()) == list(range(16))
    np.testing.assert_array_equal(
        np.asarray(packed[1, 3]).reshape(16, pairs).T,
        np.asarray(w[3 * pairs : 4 * pairs, 16:32])[:, order],
    )


def test_packable_shapes_and_dtypes():
    assert skinny.packable(bf16(0, (64, 32)))
    assert not skinny.packable(bf16(0, (64, 40)))  # outputs not a multiple of 16
    assert not skinny.packable(jnp.zeros((64, 32), jnp.float32))
    assert not skinny.packable(bf16(0, (2, 64, 32)))
    if skinny.pair_rows() == 2:
        assert not skinny.packable(bf16(0, (63, 32)))  # inputs interleave in pairs


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 33])
@pytest.mark.parametrize("k,n", [(64, 16), (96, 160), (576, 960)])
def test_matmul_equals_xla_within_float32_rounding(rows, k, n):
    x, w = bf16(1, (rows, k)), bf16(2, (k, n), 0.05)
    got = jax.jit(lambda x, v: skinny.PackedWeight(v).matmul(x.astype(jnp.float32)))(
        x, skinny.pack(w)
    )
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
    # Both operands are bfloat16 (products exact in float32): only the float32 sums round.
    assert np.all(np.abs(np.asarray(got) - exact) <= 4 * k * 2**-24 * bound + 1e-30)


def test_large_row_counts_go_to_xla_on_amx_cpus_only():
    assert skinny.xla_min_rows(frozenset({"avx512f", "amx_bf16"})) == skinny.AMX_XLA_MIN_ROWS
    assert skinny.xla_min_rows(frozenset({"avx512f", "avx512_bf16"})) > 2**40
    # Whichever path a row count takes, the product is the weight's (here 256 rows, which
    # XLA takes on an AMX CPU and the kernel elsewhere).
    x, w = bf16(5, (256, 96)), bf16(6, (96, 160), 0.05)
    got = jax.jit(lambda x, v: skinny.PackedWeight(v).matmul(x.astype(jnp.float32)))(
        x, skinny.pack(w)
    )
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
    assert np.all(np.abs(np.asarray(got) - exact) <= 4 * 96 * 2**-24 * bound + 1e-30)


def test_matmul_returns_the_activations_dtype():
    x, w = bf16(3, (3, 64)), bf16(4, (64, 32))
    out = skinny.PackedWeight(skinny.pack(w)).matmul(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                   np.float32), rtol=1e-2, atol=1e-2,
    )  # fmt: skip


def tiny(preset: str):
    model_cls, config = preset_config(preset)
    small = dict(hidden_size=64, intermediate_size=96, num_layers=2, vocab_size=256,
                 num_heads=4, num_kv_heads=2, head_dim=16)  # fmt: skip
    if config.layer_types:  # Gemma: keep one sliding and one full layer
        small["layer_types"] = ("sliding", "full")
    return model_cls, dataclasses.replace(config, **small)


def build(preset: str, packed: bool, monkeypatch):
    model_cls, config = tiny(preset)
    model = model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with monkeypatch.context() as m:
        if not packed:
            m.setattr(skinny, "available", lambda: False)
        model.unstack_layers()
    return model


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b",
                                    "gemma-2-2b", "gemma-3-270m"])  # fmt: skip
def test_packed_model_matches_unpacked(preset, monkeypatch):
    """Tied and untied heads, q/k/v biases (Qwen), Gemma's scaled embeddings and soft-capped
    logits: prefill and decode logits within bfloat16 rounding, the same greedy tokens."""
    plain, packed = build(preset, False, monkeypatch), build(preset, True, monkeypatch)
    assert packed.packed and not plain.packed
    assert "wqkv" in packed.packed and "w_down" in packed.packed
    assert packed.lm_head_panels is not None
    assert packed.weight_copies == (("lm_head_panels",) if packed.config.tie_word_embeddings
                                    else ())  # fmt: skip
    runs = [PagedModelRunner(m, num_seqs=2, max_len=64) for m in (plain, packed)]
    prompts = [[5, 17, 42, 7, 99, 3], [200, 11]]
    new = prompts
    for _ in range(6):
        outs = [r.step(new) for r in runs]
        a, b = outs[0].logits, outs[1].logits
        np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max(), rtol=0)
        picked = [np.argmax(o.logits, axis=-1) for o in outs]
        np.testing.assert_array_equal(picked[1], picked[0])
        new = [[int(t)] for t in picked[0]]  # decode the greedy token next


def test_switched_off_by_environment():
    env = dict(os.environ, XLASERVE_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
    code = "from xlaserve.kernels_cpu import skinny; print(skinny.available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
