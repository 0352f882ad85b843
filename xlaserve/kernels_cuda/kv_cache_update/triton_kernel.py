"""KV-cache write as a Triton kernel; contract and truth in `reference.py`.

One program per new token copies its [2K * H] row to slot `slot_mapping[t]` of the flat cache;
slot -1 (padding) is skipped.
"""

import torch
import triton
import triton.language as tl

from xlaserve.kernels_cuda.kv_cache_update.reference import validate_inputs
from xlaserve.kernels_cuda.triton_support import check_runnable


@triton.jit
def _kv_cache_update_kernel(
    new_kv_ptr,  # [T, 2K * H] in the cache's dtype
    kv_cache_ptr,  # [P * page_size, 2K * H] (flat view)
    slot_mapping_ptr,  # int[T]
    stride_new_t,
    ROW: tl.constexpr,  # 2K * H
    BLOCK: tl.constexpr,  # ROW rounded up to a power of two
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    row = tl.load(new_kv_ptr + token * stride_new_t + offs, mask=mask)
    tl.store(kv_cache_ptr + slot * ROW + offs, row, mask=mask)


def kv_cache_update(
    new_kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> torch.Tensor:
    """Same contract as `reference.kv_cache_update`: writes in place and returns kv_cache.

    new_kv: [T, 2K, H]; kv_cache: [P, page_size, 2K, H] contiguous; slot_mapping: int[T].
    """
    validate_inputs(new_kv, kv_cache, slot_mapping)
    check_runnable(_kv_cache_update_kernel, kv_cache.device)
    if new_kv.shape[0] == 0:
        return kv_cache
    # Cast with torch (round to nearest even; Triton's interpreter truncates), so the kernel is
    # a plain copy; [T, 2K*H] copies only when the rows are strided.
    new_kv = new_kv.to(kv_cache.dtype).reshape(new_kv.shape[0], -1)
    if new_kv.stride(1) != 1:
        new_kv = new_kv.contiguous()
    row = new_kv.shape[1]
    _kv_cache_update_kernel[(new_kv.shape[0],)](
        new_kv, kv_cache, slot_mapping, new_kv.stride(0), ROW=row, BLOCK=triton.next_power_of_2(row)
    )
    return kv_cache
