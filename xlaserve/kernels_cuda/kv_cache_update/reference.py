"""Plain-torch KV-cache write: scatter new K/V rows into their page slots, in place."""

import torch


def validate_inputs(
    new_kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Raises ValueError naming the first inconsistent shape, dtype or layout."""
    if kv_cache.ndim != 4:
        raise ValueError(
            f"kv_cache must be [num_pages, page_size, 2*K, H], got shape {tuple(kv_cache.shape)}"
        )
    if new_kv.ndim != 3 or tuple(new_kv.shape[1:]) != tuple(kv_cache.shape[2:]):
        raise ValueError(
            f"new_kv must be [T, {kv_cache.shape[2]}, {kv_cache.shape[3]}] to match kv_cache "
            f"{tuple(kv_cache.shape)}, got {tuple(new_kv.shape)}"
        )
    if tuple(slot_mapping.shape) != (new_kv.shape[0],):
        raise ValueError(
            f"slot_mapping must be [T={new_kv.shape[0]}], got shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (it is written in place through a flat view)")


def kv_cache_update(
    new_kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> torch.Tensor:
    """Writes `new_kv[t]` to flat slot `slot_mapping[t]` (page * page_size + offset), in place.

    new_kv: [T, 2K, H], K and V interleaved on axis 1 like the cache.
    kv_cache: [P, page_size, 2K, H], contiguous.
    slot_mapping: int[T]; rows marked -1 (padding) are skipped.
    Returns kv_cache (the same tensor, updated).
    """
    validate_inputs(new_kv, kv_cache, slot_mapping)
    flat = kv_cache.view(-1, *kv_cache.shape[2:])  # [P*page_size, 2K, H]
    keep = slot_mapping >= 0
    flat[slot_mapping[keep].long()] = new_kv[keep].to(kv_cache.dtype)
    return kv_cache
