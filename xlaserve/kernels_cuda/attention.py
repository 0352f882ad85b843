"""Attention over the paged KV cache in torch: metadata, and the cache write + attention of one
layer through either the plain-torch references or the Triton kernels.

The cache is one tensor [L, P, page_size, 2K, H] (the JAX engine's layout); a layer works on its
[P, page_size, 2K, H] view, written in place.
"""

from dataclasses import dataclass

import torch

from xlaserve.kernels_cuda.kv_cache_update import reference as kv_update_reference
from xlaserve.kernels_cuda.ragged_paged_attention import reference as rpa_reference

ATTENTION_IMPLS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each new token's K/V goes and which pages each sequence reads (all int32).

    slot_mapping: [T] flat slot (page * page_size + offset) per token, -1 for padding.
    cu_q_lens: [S + 1] cumulative new-token counts per sequence.
    kv_lens: [S] tokens in the cache per sequence after this step.
    page_indices: [S, pages_per_seq] page table.
    num_seqs: [1] number of real sequences.
    """

    slot_mapping: torch.Tensor
    cu_q_lens: torch.Tensor
    kv_lens: torch.Tensor
    page_indices: torch.Tensor
    num_seqs: torch.Tensor

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        return AttentionMetadata(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def resolve_attention(impl: str, device: torch.device | str) -> str:
    """The implementation `impl` names on `device`: "auto" is the Triton kernel on CUDA and the
    torch reference elsewhere; "triton" on the CPU needs TRITON_INTERPRET=1 set before triton
    is imported (the tests force it that way). Raises ValueError when it cannot run there."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}"
        )
    device = torch.device(device)
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "reference"
    if impl == "triton":
        try:
            from xlaserve.kernels_cuda.ragged_paged_attention import triton_kernel
        except ImportError as e:
            raise ValueError(f"attention 'triton' needs the triton package: {e}") from None
        from xlaserve.kernels_cuda.triton_support import check_runnable

        kernel = triton_kernel._ragged_paged_attention_kernel
        try:
            check_runnable(kernel, device)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    return impl


def write_and_attend(
    q: torch.Tensor,
    new_kv: torch.Tensor,
    layer_cache: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    impl: str = "reference",
) -> torch.Tensor:
    """Writes the new K/V into `layer_cache` in place, then attends over it.

    q: [T, N, H]; new_kv: [T, 2K, H]; layer_cache: [P, page_size, 2K, H]. Returns [T, N, H].
    impl: "reference" or "triton" (already resolved by `resolve_attention`).
    """
    if impl == "triton":
        from xlaserve.kernels_cuda.kv_cache_update import triton_kernel as kv_update
        from xlaserve.kernels_cuda.ragged_paged_attention import triton_kernel as rpa
    else:
        kv_update, rpa = kv_update_reference, rpa_reference
    kv_update.kv_cache_update(new_kv, layer_cache, metadata.slot_mapping)
    return rpa.ragged_paged_attention(
        q,
        layer_cache,
        metadata.kv_lens,
        metadata.page_indices,
        metadata.cu_q_lens,
        metadata.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
    )
