"""Small building blocks shared by the decoder families: RMSNorm, rotary embedding, SwiGLU."""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.kernels_cpu.skinny import PackedWeight
from xlaserve.quantization.linear import QuantizedWeight

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` / `rope_parameters`, reduced to what the supported types use."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, scaling: dict | None) -> "RopeScaling":
        if not scaling:
            return cls()
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "default":
            return cls()
        return cls(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", 8192)
            ),
        )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse frequencies f32[H // 2], with HF's linear and llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_mid, blended, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin f32[T, H // 2] for integer positions [T]."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def mrope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, section: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Multi-section rope (Qwen2.5-VL's M-RoPE): cos, sin f32[T, H // 2] for positions i32[3, T]
    (temporal, height, width); frequency band i of `section` (sizes summing to H // 2) turns
    with positions[i % 3]."""
    axis = np.repeat(np.arange(len(section)) % 3, section)  # [H/2] which position row
    pos = positions.astype(jnp.float32)[axis, :].T  # [T, H/2]
    angles = pos * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation (HF `rotate_half` convention) of x [T, heads, H]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, heads, H/2]
    cos = cos[:, None, :].astype(x.dtype)  # [T, 1, H/2]
    sin = sin[:, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 and cast back (as HF Llama does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, in] @ w [in, out], accumulated in float32 and returned in x's dtype.

    Asking for a float32 result keeps 16-bit matmuls on XLA's fast CPU path (without it the
    CPU backend converts both operands to float32 first); accelerators accumulate in float32
    either way. A quantized weight (xlaserve/quantization) runs its own matmul.
    """
    if isinstance(w, (QuantizedWeight, PackedWeight)):
        return w.matmul(x)
    rows = at_least_two_rows(x.astype(w.dtype))
    out = jnp.dot(rows, w, preferred_element_type=jnp.float32)
    return out[: x.shape[0]].astype(x.dtype)


def at_least_two_rows(x: jax.Array) -> jax.Array:
    """x [M, ...] with its row repeated when M == 1: XLA's CPU backend runs a 16-bit
    matrix-vector product about 10x slower than the same product with two rows."""
    return jnp.concatenate([x, x]) if x.shape[0] == 1 else x


def swiglu(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act=jax.nn.silu
) -> jax.Array:
    """act(x @ w_gate) * (x @ w_up) @ w_down for x [T, D], w_gate/w_up [D, F], w_down [F, D];
    act is silu (SwiGLU) or tanh-approximated gelu (Gemma's GeGLU)."""
    gate = act(linear(x, w_gate))  # [T, F]
    return linear(gate * linear(x, w_up), w_down)  # [T, D]


def fused_swiglu(
    x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, act=jax.nn.silu
) -> jax.Array:
    """swiglu with the gate and up projections as one [D, 2F] matmul (gate columns first)."""
    gate, up = jnp.split(linear(x, w_gate_up), 2, axis=-1)  # [T, F] each
    return linear(act(gate) * up, w_down)  # [T, D]
