"""Per-channel and per-token 8-bit quantization: error bounds and the quantized matmuls
against their float references."""

import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.quantization.int8 import (
    FP8_MAX,
    dequantize_per_channel,
    quantize_per_channel,
    quantize_per_channel_fp8,
    quantize_per_token,
    quantize_per_token_fp8,
)
from xlaserve.quantization.linear import QuantizedWeight


def test_per_channel_int8_is_within_half_a_step_of_every_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48)).astype(np.float32) * rng.uniform(0.01, 3, size=48)
    w[:, 5] = 0.0  # an all-zero channel keeps scale 1 and values 0
    q, scale = quantize_per_channel(jnp.asarray(w))
    assert q.dtype == jnp.int8 and q.shape == (64, 48) and scale.shape == (48,)
    amax = np.abs(w).max(axis=0)
    np.testing.assert_allclose(np.asarray(scale), np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
    err = np.abs(np.asarray(dequantize_per_channel(q, scale)) - w)
    assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-6))
    assert np.abs(np.asarray(q)).max() == 127  # each channel's absmax maps to +-127
    assert np.all(np.asarray(q)[:, 5] == 0)


def test_per_channel_over_stacked_layers_keeps_one_scale_per_layer_and_channel():
    w = jnp.stack([jnp.full((4, 3), 1.0), jnp.full((4, 3), 254.0)])  # [L=2, in, out]
    q, scale = quantize_per_channel(w)
    assert scale.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(scale), [[1 / 127] * 3, [2.0] * 3], rtol=1e-6)
    assert np.all(np.asarray(q) == 127)


def test_per_token_int8_is_within_half_a_step_of_every_activation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 32)).astype(np.float32) * rng.uniform(0.1, 50, size=(9, 1))
    q, scale = quantize_per_token(jnp.asarray(x))
    assert scale.shape == (9, 1)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale) - x)
    assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-6))


def test_fp8_per_channel_relative_error_is_within_e4m3_rounding():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(128, 16)).astype(np.float32)
    q, scale = quantize_per_channel_fp8(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn
    back = np.asarray(dequantize_per_channel(q, scale))
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal numbers; values
    # below the smallest normal (2^-6 of the scale grid) are off by at most half a subnormal step.
    tol = np.maximum(np.abs(w) * 2.0**-4, np.asarray(scale) * 2.0**-10)
    assert np.all(np.abs(back - w) <= tol * (1 + 1e-6))
    np.testing.assert_allclose(np.abs(back).max(axis=0), np.abs(w).max(axis=0), rtol=1e-6)
    assert float(np.abs(np.asarray(q, np.float32)).max()) == FP8_MAX


def test_fp8_per_token_relative_error_is_within_e4m3_rounding():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 64)).astype(np.float32) * rng.uniform(0.1, 50, size=(9, 1))
    x[3] = 0.0  # an all-zero token keeps scale 1 and values 0
    q, scale = quantize_per_token_fp8(jnp.asarray(x))
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (9, 1)
    back = np.asarray(q, np.float32) * np.asarray(scale)
    tol = np.maximum(np.abs(x) * 2.0**-4, np.asarray(scale) * 2.0**-10)
    assert np.all(np.abs(back - x) <= tol * (1 + 1e-6))
    assert np.all(back[3] == 0) and float(np.asarray(scale)[3, 0]) == 1.0
    np.testing.assert_allclose(np.abs(back).max(axis=1), np.abs(x).max(axis=1), rtol=1e-6)


@pytest.mark.parametrize("method", ["int8", "w8a8", "fp8", "fp8_dynamic"])
@pytest.mark.parametrize("rows", [1, 7])
def test_quantized_matmul_matches_float_reference(method, rows):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(rows, 96)).astype(np.float32)
    w = rng.normal(size=(96, 40)).astype(np.float32) * 0.05
    fn = quantize_per_channel_fp8 if method.startswith("fp8") else quantize_per_channel
    q, scale = fn(jnp.asarray(w))
    out = np.asarray(QuantizedWeight(q, scale, method).matmul(jnp.asarray(x)))
    assert out.shape == (rows, 40)
    # The exact product with the dequantized weight (and, for w8a8, dequantized activations):
    wd = np.asarray(dequantize_per_channel(q, scale), np.float64)
    xd = x.astype(np.float64)
    if method == "w8a8":
        xq, xs = quantize_per_token(jnp.asarray(x))
        xd = np.asarray(xq, np.float64) * np.asarray(xs, np.float64)
    if method == "fp8_dynamic":  # float8 activations, one scale per token
        xq, xs = quantize_per_token_fp8(jnp.asarray(x))
        xd = np.asarray(xq, np.float64) * np.asarray(xs, np.float64)
    np.testing.assert_allclose(out, xd @ wd, rtol=1e-5, atol=1e-5)
    # ... and the float product within the quantization error (relative to the output scale).
    rel = np.abs(out - x @ w).max() / np.abs(x @ w).max()
    bound = {"int8": 0.02, "w8a8": 0.03, "fp8": 0.06, "fp8_dynamic": 0.08}[method]
    assert rel < bound


@pytest.mark.parametrize(
    "device,supported",
    [
        (dict(platform="gpu", compute_capability="9.0"), True),  # Hopper
        (dict(platform="gpu", compute_capability="8.9"), True),  # Ada
        (dict(platform="gpu", compute_capability="10.0"), True),  # Blackwell
        (dict(platform="gpu", compute_capability="8.0"), False),  # Ampere: no fp8 units
        (dict(platform="tpu", device_kind="TPU7x"), True),
        (dict(platform="tpu", device_kind="TPU v6 lite"), False),
        (dict(platform="tpu", device_kind="TPU v5p"), False),
        (dict(platform="cpu", device_kind="cpu"), False),
    ],
)
def test_fp8_activations_only_where_the_device_multiplies_fp8(device, supported):
    from types import SimpleNamespace

    from xlaserve.quantization.model import fp8_matmul_supported

    assert fp8_matmul_supported(SimpleNamespace(**device)) is supported


def test_fp8_activations_switch_every_projection_to_fp8_dynamic():
    import dataclasses

    from xlaserve.quantization.linear import WeightQuant, bind_quantized

    quant = WeightQuant("fp8")
    params = {"wq": jnp.zeros((4, 4), jnp.float8_e4m3fn), "wq_scale": jnp.ones(4)}
    assert bind_quantized(params, quant)["wq"].method == "fp8"
    quant = dataclasses.replace(quant, fp8_activations=True)
    assert bind_quantized(params, quant)["wq"].method == "fp8_dynamic"
