"""Ragged paged attention in plain torch: the numerical truth for the Triton kernel.

Same contract as `xlaserve.kernels_pallas.ragged_paged_attention.reference` (the jnp truth):
all sequences' new query tokens are concatenated along T; sequence s owns query rows
`cu_q_lens[s]:cu_q_lens[s + 1]`, which are the last `q_len` of its `kv_lens[s]` tokens, so
prefill, chunked prefill and decode mix freely. Attention is causal within each sequence,
accumulation is float32, rows past `cu_q_lens[num_seqs]` (padding) are zeros.

This version loops over sequences on the host (it reads the small metadata tensors), gathers
each sequence's pages and runs one masked softmax: slow, but plain enough to trust.
Axis letters (docs/glossary.md): T tokens, S sequences, N query heads, K kv heads,
G = N // K, H head dim, P pages, L kv positions of one sequence.
"""

import torch


def validate_inputs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    page_indices: torch.Tensor,
    cu_q_lens: torch.Tensor,
    num_seqs: torch.Tensor,
) -> None:
    """Raises ValueError naming the first inconsistent shape or dtype."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {tuple(q.shape)}")
    if kv_cache.ndim != 4:
        raise ValueError(
            f"kv_cache must be [P, page_size, 2*K, H], got shape {tuple(kv_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1:]
    kv_heads2, cache_head_dim = kv_cache.shape[2:]
    if cache_head_dim != head_dim:
        raise ValueError(
            f"head dim of q {tuple(q.shape)} and kv_cache {tuple(kv_cache.shape)} differ"
        )
    if kv_heads2 % 2:
        raise ValueError(f"kv_cache axis 2 must be 2*K (K and V interleaved), got {kv_heads2}")
    if num_heads % (kv_heads2 // 2):
        raise ValueError(
            f"query heads N={num_heads} must be a multiple of kv heads K={kv_heads2 // 2}"
        )
    if kv_lens.ndim != 1:
        raise ValueError(f"kv_lens must be i32[S], got shape {tuple(kv_lens.shape)}")
    num_seqs_cap = kv_lens.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != num_seqs_cap:
        raise ValueError(
            f"page_indices must be i32[S={num_seqs_cap}, pages_per_seq], "
            f"got {tuple(page_indices.shape)}"
        )
    if tuple(cu_q_lens.shape) != (num_seqs_cap + 1,):
        raise ValueError(
            f"cu_q_lens must be i32[S + 1 = {num_seqs_cap + 1}], got {tuple(cu_q_lens.shape)}"
        )
    if tuple(num_seqs.shape) != (1,):
        raise ValueError(f"num_seqs must be i32[1], got shape {tuple(num_seqs.shape)}")
    for name, t in (
        ("kv_lens", kv_lens),
        ("page_indices", page_indices),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    tensors = (q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"inputs are on several devices: {[str(t.device) for t in tensors]}")


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
) -> torch.Tensor:
    """Causal attention of ragged query rows over paged K/V.

    q: [T, N, H]; kv_cache: [P, page_size, 2K, H] (K and V interleaved on axis 2);
    kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1];
    num_seqs: i32[1] (only the first num_seqs sequences are real).
    sliding_window: a query at position p sees keys at positions > p - sliding_window.
    soft_cap: scores become soft_cap * tanh(scores / soft_cap).
    Returns [T, N, H] in q's dtype; rows past cu_q_lens[num_seqs] (padding) are zeros.
    """
    validate_inputs(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_heads, head_dim = q.shape[1:]
    page_size, kv_heads2 = kv_cache.shape[1:3]
    num_kv_heads = kv_heads2 // 2
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)  # [T, N, H]
    cu, lens = cu_q_lens.tolist(), kv_lens.tolist()
    for s in range(int(num_seqs[0])):
        q_start, q_end, kv_len = cu[s], cu[s + 1], lens[s]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        if not 0 < q_len <= kv_len:
            raise ValueError(f"sequence {s}: {q_len} query rows but kv_len {kv_len}")
        pages = page_indices[s, : -(-kv_len // page_size)]  # [pages of this sequence]
        kv = kv_cache[pages].reshape(-1, num_kv_heads, 2, head_dim)[:kv_len].float()  # [L, K, 2, H]
        k, v = kv[:, :, 0], kv[:, :, 1]  # [L, K, H]
        qs = q[q_start:q_end].float().reshape(q_len, num_kv_heads, group, head_dim)  # [Tq, K, G, H]
        scores = torch.einsum("tkgh,lkh->tkgl", qs, k) * sm_scale  # [Tq, K, G, L]
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)  # [Tq]
        key_pos = torch.arange(kv_len, device=q.device)  # [L]
        mask = key_pos[None, :] <= q_pos[:, None]  # [Tq, L]
        if sliding_window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # every row sees at least its own key
        rows = torch.einsum("tkgl,lkh->tkgh", probs, v)  # [Tq, K, G, H]
        out[q_start:q_end] = rows.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out
