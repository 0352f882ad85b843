"""Grouped LoRA matmul (shrink + expand per token's adapter slot): the plain-jnp reference
(the CPU path) and a Pallas kernel with the same contract (GPU and TPU)."""

import jax

from xlaserve.kernels_pallas.lora import reference

IMPLS = ("auto", "reference", "pallas")


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The implementation to run: "auto" is the kernel on GPU and TPU, the reference
    elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"unknown LoRA implementation {impl!r}; choose from {IMPLS}")
    if impl == "auto":
        platform = platform or jax.default_backend()
        return "pallas" if platform in ("gpu", "tpu") else "reference"
    return impl


def lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    token_slots: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """f32[T, O]: each token's x [T, I] through its slot's A [I, S, R] and B [S, R, O]
    (token_slots i32[T]: slot s >= 1 is stored slot s - 1; 0 = no adapter). Contract in
    `reference.py`."""
    impl = resolve_impl(impl)
    if impl == "reference":
        return reference.lora_delta(x, a, b, token_slots)
    from xlaserve.kernels_pallas.lora import pallas

    return pallas.lora_delta(x, a, b, token_slots, interpret=interpret)


__all__ = ["IMPLS", "lora_delta", "resolve_impl"]
