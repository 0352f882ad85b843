"""Grouped LoRA matmul, plain jnp: the truth for the kernel and the CPU path.

Every token t with slot s = token_slots[t] >= 1 adds x[t] @ A[:, s - 1, :] @ B[s - 1]; slot 0
means no adapter and is not stored (it would only add zeros and cost a slot's reads). Shapes
never depend on which adapters are present: all S stored slots are multiplied in one shrink
and one expand matmul and each token keeps its own slot's columns, so loading or mixing
adapters never compiles anything new.

Axis letters (docs/glossary.md): T tokens, S stored adapter slots (max_loras), R rank,
I the base weight's input width, O its output width.
A is laid out [I, S, R] so that A.reshape(I, S * R) is free; B is [S, R, O].
"""

import jax
import jax.numpy as jnp


def validate_inputs(x: jax.Array, a: jax.Array, b: jax.Array, token_slots: jax.Array) -> None:
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3 or token_slots.ndim != 1:
        raise ValueError(
            f"expected x [T, I], a [I, S, R], b [S, R, O], token_slots [T]; got x {x.shape}, "
            f"a {a.shape}, b {b.shape}, token_slots {token_slots.shape}"
        )
    T, I = x.shape
    if a.shape[0] != I or b.shape[:2] != a.shape[1:] or token_slots.shape[0] != T:
        raise ValueError(
            f"shapes do not agree: x {x.shape}, a {a.shape}, b {b.shape}, "
            f"token_slots {token_slots.shape}"
        )


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, token_slots: jax.Array) -> jax.Array:
    """f32[T, O]: x [T, I] through each token's adapter slot (a [I, S, R], b [S, R, O],
    token_slots i32[T] in [0, S]; 0 = none). Accumulates in float32; the shrink is rounded to
    b's dtype before the expand (as a bfloat16 model would)."""
    validate_inputs(x, a, b, token_slots)
    T, I = x.shape
    _, S, R = a.shape
    shrunk = jnp.dot(x.astype(a.dtype), a.reshape(I, S * R), preferred_element_type=jnp.float32)
    own = token_slots[:, None] == jnp.arange(1, S + 1, dtype=token_slots.dtype)[None, :]  # [T, S]
    shrunk = jnp.where(own[:, :, None], shrunk.reshape(T, S, R), 0.0)  # [T, S, R]
    return jnp.dot(
        shrunk.reshape(T, S * R).astype(b.dtype),
        b.reshape(S * R, b.shape[-1]),
        preferred_element_type=jnp.float32,
    )  # [T, O]
