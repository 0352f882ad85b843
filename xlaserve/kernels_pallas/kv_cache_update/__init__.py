"""KV-cache write: the plain-jnp reference and a TPU kernel with the same contract."""

import jax

from xlaserve.kernels_pallas.kv_cache_update import reference

IMPLS = ("auto", "reference", "tpu")


def kv_cache_update(
    new_kv: jax.Array,
    kv_cache: jax.Array,
    slot_mapping: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Writes new_kv [T, 2K, H] into kv_cache [P, page_size, 2K, H] at slot_mapping i32[T].

    Slots are page * page_size + offset; -1 marks padding rows, which are skipped.
    impl: "auto" (the TPU kernel on TPU, the reference elsewhere: XLA's scatter is already a
    single pass on GPU and CPU), "reference" or "tpu". interpret: run the kernel on CPU.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown kv cache update implementation {impl!r}; choose from {IMPLS}")
    if impl == "auto":
        impl = "tpu" if jax.default_backend() == "tpu" else "reference"
    if impl == "reference":
        return reference.kv_cache_update(new_kv, kv_cache, slot_mapping)
    from xlaserve.kernels_pallas.kv_cache_update import tpu

    return tpu.kv_cache_update(new_kv, kv_cache, slot_mapping, interpret=interpret)


__all__ = ["IMPLS", "kv_cache_update"]
