"""Plain-jnp KV-cache write: scatter new K/V rows into their page slots."""

import jax
import jax.numpy as jnp


def validate_inputs(new_kv: jax.Array, kv_cache: jax.Array, slot_mapping: jax.Array) -> None:
    if kv_cache.ndim != 4:
        raise ValueError(
            f"kv_cache must be [num_pages, page_size, 2*K, H], got shape {kv_cache.shape}"
        )
    if new_kv.ndim != 3 or new_kv.shape[1:] != kv_cache.shape[2:]:
        raise ValueError(
            f"new_kv must be [T, {kv_cache.shape[2]}, {kv_cache.shape[3]}] to match kv_cache "
            f"{kv_cache.shape}, got {new_kv.shape}"
        )
    if slot_mapping.shape != (new_kv.shape[0],):
        raise ValueError(
            f"slot_mapping must be [T={new_kv.shape[0]}], got shape {slot_mapping.shape}"
        )
    if not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping must be integer, got {slot_mapping.dtype}")


def kv_cache_update(new_kv: jax.Array, kv_cache: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Writes `new_kv[t]` to flat slot `slot_mapping[t]` (page * page_size + offset).

    new_kv: [T, 2K, H], K and V interleaved on axis 1 like the cache.
    kv_cache: [P, page_size, 2K, H].
    slot_mapping: i32[T]; rows marked -1 (padding) are skipped.
    Returns the updated cache (same shape); under jit with donation it is updated in place.
    """
    validate_inputs(new_kv, kv_cache, slot_mapping)
    num_pages, page_size, kv_heads2, head_dim = kv_cache.shape
    num_slots = num_pages * page_size
    flat = kv_cache.reshape(num_slots, kv_heads2, head_dim)  # [P*page_size, 2K, H]
    # Padding rows go out of bounds and are dropped by the scatter.
    slots = jnp.where(slot_mapping >= 0, slot_mapping, num_slots)
    new_kv = new_kv.astype(kv_cache.dtype)
    if slots.shape[0] == 1:
        # XLA rewrites a one-row scatter as a bounds-checked dynamic-update-slice, which it
        # cannot do in place: every layer would copy the whole cache (seconds per decode step
        # on the CPU). A second, dropped row keeps it a scatter, updated in place.
        slots = jnp.concatenate([slots, jnp.full((1,), num_slots, slots.dtype)])
        new_kv = jnp.concatenate([new_kv, new_kv])
    flat = flat.at[slots].set(new_kv, mode="drop")
    return flat.reshape(kv_cache.shape)
