"""The embedding table and LM head quantized per vocabulary row (int8 / w8a8 / fp8), and a
tied GGUF model's token lookup from the packed LM-head rows: lookups equal the dequantized
rows, logits equal the product with them, and the bytes held shrink accordingly."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xlaserve.models.registry import preset_config
from xlaserve.quantization.int8 import (
    FP8_MAX,
    dequantize_per_row,
    quantize_per_row,
    quantize_per_row_fp8,
)
from xlaserve.quantization.linear import WeightQuant, quantized_rows_matmul
from xlaserve.quantization.model import quantize_model

Q = gguf.GGMLQuantizationType
V, D = 256, 64
IDS = jnp.asarray([0, 5, 255, 17, 5, 128], jnp.int32)


def tiny_model(preset: str, dtype=jnp.bfloat16):
    """A random model of `preset`'s family: smollm2-135m ties its embeddings, llama-3-8b not."""
    model_cls, config = preset_config(preset)
    small = dict(hidden_size=D, intermediate_size=96, num_layers=2, vocab_size=V, num_heads=4,
                 num_kv_heads=2, head_dim=16)  # fmt: skip
    return model_cls(dataclasses.replace(config, **small), dtype=dtype, rngs=nnx.Rngs(0))


def held_bytes(model) -> dict[str, int]:
    """Bytes per top-level parameter (layers together), as the runner's device_info counts
    them: every parameter except the weight copies."""
    state = nnx.state(model, nnx.Param)
    return {
        name: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(sub))
        for name, sub in state.items()
        if name not in model.weight_copies
    }


def test_per_row_int8_is_within_half_a_step_of_every_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 24)).astype(np.float32) * rng.uniform(0.01, 3, size=(40, 1))
    w[7] = 0.0  # an all-zero row keeps scale 1 and values 0
    q, scale = quantize_per_row(jnp.asarray(w))
    assert q.dtype == jnp.int8 and q.shape == (40, 24) and scale.shape == (40,)
    s = np.asarray(scale)
    amax = np.abs(w).max(axis=1)
    np.testing.assert_allclose(s, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
    back = np.asarray(dequantize_per_row(q, scale, jnp.float32))
    assert np.all(np.abs(back - w) <= s[:, None] / 2 + np.abs(w) * 2.0**-21)  # + f32 rounding
    assert np.all(np.abs(np.asarray(q)).max(axis=1)[amax > 0] == 127)
    assert np.all(np.asarray(q)[7] == 0)


def test_per_row_fp8_keeps_each_rows_absmax_and_e4m3_rounding():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 128)).astype(np.float32) * rng.uniform(0.01, 3, size=(16, 1))
    q, scale = quantize_per_row_fp8(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (16,)
    back = np.asarray(dequantize_per_row(q, scale, jnp.float32))
    s = np.asarray(scale)[:, None]
    tol = np.maximum(np.abs(w) * 2.0**-4, s * 2.0**-10)  # 3 mantissa bits; subnormals
    assert np.all(np.abs(back - w) <= tol * (1 + 1e-6))
    np.testing.assert_allclose(np.abs(back).max(axis=1), np.abs(w).max(axis=1), rtol=1e-6)
    assert float(np.abs(np.asarray(q, np.float32)).max()) == FP8_MAX


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("fn", [quantize_per_row, quantize_per_row_fp8], ids=["int8", "fp8"])
def test_quantized_rows_matmul_is_the_product_with_the_dequantized_rows(rows, fn):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(rows, D)), jnp.bfloat16)
    q, scale = fn(jnp.asarray(rng.normal(size=(V, D)) * 0.05, jnp.float32))
    out = jax.jit(quantized_rows_matmul, static_argnums=3)(x, q, scale, False)
    assert out.shape == (rows, V) and out.dtype == jnp.float32
    x64, q64 = np.asarray(x, np.float64), np.asarray(q.astype(jnp.float32), np.float64)
    want = (x64 @ q64.T) * np.asarray(scale, np.float64)
    # bfloat16 x 8-bit products are exact in float32: only the D float32 sums round.
    bound = (np.abs(x64) @ np.abs(q64).T) * np.asarray(scale, np.float64)
    assert np.all(np.abs(np.asarray(out) - want) <= D * 2**-24 * bound + 1e-30)


@pytest.mark.parametrize("method", ["int8", "w8a8", "fp8"])
@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3-8b"])
def test_quantized_tables_look_up_and_project_dequantized_rows(preset, method):
    model = tiny_model(preset)
    tied = model.config.tie_word_embeddings
    embed = np.asarray(model.embed[...], np.float32)  # [V, D]
    head = embed if tied else np.asarray(model.lm_head[...], np.float32).T  # as rows [V, D]
    quantize_model(model, method)
    value_dtype = jnp.float8_e4m3fn if method == "fp8" else jnp.int8
    tables = [("embed", "embed_scale", embed)] + ([] if tied else [("lm_head", "lm_head_scale",
                                                                    head)])  # fmt: skip
    for name, scale_name, original in tables:
        values, scale = getattr(model, name)[...], getattr(model, scale_name)[...]
        assert values.dtype == value_dtype and values.shape == (V, D)
        assert scale.dtype == jnp.float32 and scale.shape == (V,)
        if method != "fp8":  # each weight within half a step of its row's scale
            back = np.asarray(dequantize_per_row(values, scale, jnp.float32))
            s = np.asarray(scale)[:, None]
            # (plus the float32 rounding of w / s and q * s: a few ulps of w)
            assert np.all(np.abs(back - original) <= s / 2 + np.abs(original) * 2.0**-21)
    assert (model.lm_head_scale is None) == tied
    values, scale = model.embed[...], model.embed_scale[...]
    got = np.asarray(nnx.jit(lambda m, ids: m.embedding_rows(ids))(model, IDS))
    want = np.asarray(dequantize_per_row(values, scale, jnp.bfloat16))[np.asarray(IDS)]
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    hidden = jnp.asarray(np.random.default_rng(3).normal(size=(3, D)), jnp.bfloat16)
    logits = np.asarray(nnx.jit(lambda m, h: m.compute_logits(h))(model, hidden))
    rows, scale = (model.embed, model.embed_scale) if tied else (model.lm_head, model.lm_head_scale)
    want = np.asarray(quantized_rows_matmul(hidden, rows[...], scale[...], False))
    np.testing.assert_array_equal(logits, want)
    # ... within the rows' quantization error of the bfloat16 head's logits.
    exact = np.asarray(hidden, np.float64) @ head.T.astype(np.float64)
    assert np.abs(logits - exact).max() <= (0.01 if method != "fp8" else 0.05) * np.abs(exact).max()


def test_int8_tables_hold_one_byte_per_weight_plus_a_scale_per_row():
    model = tiny_model("smollm2-135m")
    before = held_bytes(model)
    quantize_model(model, "int8")
    after = held_bytes(model)
    assert before["embed"] == 2 * V * D
    assert after["embed"] + after["embed_scale"] == V * D + 4 * V
    # Every weight but the norms at one byte plus f32 scales: 53% of the bfloat16 bytes here.
    assert sum(after.values()) / sum(before.values()) < 0.54


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda t: Q(t).name)
def test_gguf_lookup_from_packed_head_rows_equals_the_dequantized_table(qtype):
    """A tied GGUF model keeps only the file's packed rows; its token lookup gives the bits of
    the table the loader would have dequantized (gguf-py, then rounded to the model dtype)."""
    rng = np.random.default_rng(4)
    table = (0.1 * rng.normal(size=(V, D))).astype(np.float32)
    packed_rows = gguf.quants.quantize(table, qtype)  # uint8 [V, row_bytes]
    plain = tiny_model("smollm2-135m")
    plain.embed.set_value(jnp.asarray(gguf.quants.dequantize(packed_rows, qtype), jnp.bfloat16))
    packed = tiny_model("smollm2-135m")
    packed.lm_head_rows = nnx.Param(jnp.asarray(packed_rows), logical_axes=("vocab", None))
    packed.quant = WeightQuant("gguf", lm_head_type=int(qtype))
    del packed.embed
    lookup = nnx.jit(lambda m, ids: m.embedding_rows(ids))
    got, want = np.asarray(lookup(packed, IDS)), np.asarray(lookup(plain, IDS))
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    assert packed.weight_copies == ()  # the packed rows are the only copy: counted
    bytes_held = held_bytes(packed)
    assert "embed" not in bytes_held and bytes_held["lm_head_rows"] == packed_rows.nbytes


def test_a_non_finite_embedding_table_is_refused_by_name():
    model = tiny_model("smollm2-135m")
    model.embed.set_value(model.embed[...].at[3, 1].set(jnp.inf))
    with pytest.raises(ValueError, match="src: embed holds NaN or infinite values.*int8"):
        quantize_model(model, "int8", source="src")
