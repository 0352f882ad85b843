"""Ragged paged attention as a Triton kernel; contract and truth in `reference.py`.

Grid: (query blocks, kv heads). A program takes up to `block_rows // G` consecutive query
tokens of ONE sequence and the G query heads that share one kv head, so its rows are
(token, head-in-group) pairs: M = block_q * G_PAD rows against [H] keys. It walks the
sequence's keys in tiles of `block_kv` positions, looking each position's page up in the page
table, with a float32 online softmax (the same masks as the reference: causal, kv_len, sliding
window). Loads are masked, so pages that the sequence does not own are never read (they may
hold NaN).

Sequence s owns the query blocks [cu_q_lens[s] // block_q + s, ...) of the grid (vLLM's
"q block" numbering): enough room for ceil(q_len / block_q) blocks per sequence with a grid of
T // block_q + S programs per kv head, found by a binary search over cu_q_lens in the kernel,
so no metadata has to reach the host.

Runs compiled on CUDA tensors, and in Triton's interpreter on CPU tensors when TRITON_INTERPRET=1
was set before this module was imported. Everything is computed in float32 with IEEE dots (no
TF32): this kernel exists for numerical parity, not speed.
"""

import torch
import triton
import triton.language as tl

from xlaserve.kernels_cuda.ragged_paged_attention.reference import validate_inputs
from xlaserve.kernels_cuda.ragged_paged_attention.tuning import block_sizes_for
from xlaserve.kernels_cuda.triton_support import check_runnable


@triton.jit
def _find_sequence(cu_q_lens_ptr, block, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s < num_seqs whose first query block cu_q_lens[s] // BLOCK_Q + s is
    <= block; -1 when there is none."""
    lo: tl.int32 = 0  # typed: the loop carries it as a tensor when compiled
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(cu_q_lens_ptr + mid) // BLOCK_Q + mid
        if first <= block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _ragged_paged_attention_kernel(
    q_ptr,  # [T, N, H]
    kv_ptr,  # [P, page_size, 2K, H]
    out_ptr,  # [T, N, H], zero-initialised
    kv_lens_ptr,  # i32[S]
    page_indices_ptr,  # i32[S, pages_per_seq]
    cu_q_lens_ptr,  # i32[S + 1]
    num_seqs_ptr,  # i32[1]
    sm_scale,
    soft_cap,
    sliding_window,
    stride_q_t,
    stride_q_n,
    stride_o_t,
    stride_o_n,
    stride_kv_p,
    stride_kv_s,
    stride_kv_h2,
    stride_pages_s,
    G: tl.constexpr,  # query heads per kv head
    G_PAD: tl.constexpr,  # G rounded up to a power of two
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_KV: tl.constexpr,  # key positions per inner step
    USE_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_seqs = tl.load(num_seqs_ptr)
    seq = _find_sequence(cu_q_lens_ptr, block, num_seqs, BLOCK_Q)
    if seq < 0:
        return
    q_start = tl.load(cu_q_lens_ptr + seq)
    q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start
    local = block - (q_start // BLOCK_Q + seq)  # this program's query block in the sequence
    if local * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq)
    context = kv_len - q_len  # keys before the first new query token

    rows = tl.arange(0, BLOCK_Q * G_PAD)  # [M]
    row_tok = local * BLOCK_Q + rows // G_PAD  # query token within the sequence
    row_g = rows % G_PAD
    row_ok = (row_tok < q_len) & (row_g < G)
    q_pos = context + row_tok  # [M] position of each row's token
    head = kv_head * G + row_g
    dims = tl.arange(0, H_PAD)
    dim_ok = dims < H
    q_off = (q_start + row_tok).to(tl.int64)[:, None] * stride_q_t + head[:, None] * stride_q_n
    q = tl.load(q_ptr + q_off + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(tl.float32)  # [M, H_PAD]

    # Keys this block can see: up to its last token, from the window start of its first one.
    kv_end = tl.minimum(kv_len, context + tl.minimum((local + 1) * BLOCK_Q, q_len))
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context + local * BLOCK_Q - sliding_window + 1, 0)
    row_max = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, H_PAD], tl.float32)
    for tile in range(kv_begin // BLOCK_KV, tl.cdiv(kv_end, BLOCK_KV)):
        key_pos = tile * BLOCK_KV + tl.arange(0, BLOCK_KV)  # [BLOCK_KV]
        key_ok = key_pos < kv_end
        page = tl.load(
            page_indices_ptr + seq * stride_pages_s + key_pos // PAGE_SIZE, mask=key_ok, other=0
        ).to(tl.int64)
        slot_off = page * stride_kv_p + (key_pos % PAGE_SIZE) * stride_kv_s  # [BLOCK_KV]
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_ptrs = kv_ptr + slot_off[:, None] + (2 * kv_head) * stride_kv_h2 + dims[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_KV, H_PAD]
        v = tl.load(k_ptrs + stride_kv_h2, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # [M, BLOCK_KV]
        if USE_SOFT_CAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1), exact enough in float32 and core-language only.
            scores = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * scores / soft_cap) + 1.0))
        mask = (key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :]
        if USE_WINDOW:
            mask = mask & (key_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(mask, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row may see no key in this tile yet (window, padding): keep exp() away from NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - safe_max[:, None])  # [M, BLOCK_KV]
        rescale = tl.exp(row_max - safe_max)  # 0 while row_max is -inf
        denom = denom * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v, input_precision="ieee")
        row_max = new_max

    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_off = (q_start + row_tok).to(tl.int64)[:, None] * stride_o_t + head[:, None] * stride_o_n
    tl.store(
        out_ptr + o_off + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def ragged_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    page_indices: torch.Tensor,
    cu_q_lens: torch.Tensor,
    num_seqs: torch.Tensor,
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_rows: int | None = None,
    block_kv: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as `reference.ragged_paged_attention`.

    q: [T, N, H]; kv_cache: [P, page_size, 2K, H]; kv_lens: i32[S];
    page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1]; num_seqs: i32[1].
    Returns [T, N, H] in q's dtype, padding rows zero. Block sizes default to tuning.py.
    """
    validate_inputs(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    check_runnable(_ragged_paged_attention_kernel, q.device)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if q.stride(2) != 1 or kv_cache.stride(3) != 1 or page_indices.stride(1) != 1:
        raise ValueError("q, kv_cache and page_indices need a contiguous last axis")
    num_tokens, num_heads, head_dim = q.shape
    page_size, kv_heads2 = kv_cache.shape[1:3]
    num_kv_heads = kv_heads2 // 2
    group = num_heads // num_kv_heads
    sizes = block_sizes_for(head_dim, group, block_rows=block_rows, block_kv=block_kv,
                            num_warps=num_warps)  # fmt: skip
    block_q = sizes.block_rows // triton.next_power_of_2(group)
    out = torch.zeros_like(q)
    grid = (num_tokens // block_q + kv_lens.shape[0], num_kv_heads)
    _ragged_paged_attention_kernel[grid](
        q,
        kv_cache,
        out,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        float(sm_scale),
        float(soft_cap or 1.0),
        int(sliding_window or 0),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        page_indices.stride(0),
        G=group,
        G_PAD=triton.next_power_of_2(group),
        H=head_dim,
        H_PAD=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=page_size,
        BLOCK_Q=block_q,
        BLOCK_KV=sizes.block_kv,
        USE_WINDOW=sliding_window is not None,
        USE_SOFT_CAP=soft_cap is not None,
        num_warps=sizes.num_warps,
    )
    return out
