"""Ragged paged attention in plain jnp: the numerical truth for the kernels.

All sequences' new query tokens are concatenated along T. Sequence s owns query rows
`cu_q_lens[s]:cu_q_lens[s + 1]`, which are the last `q_len` of its `kv_lens[s]` tokens, so
prefill (q_len == kv_len), chunked prefill (0 < q_len < kv_len) and decode (q_len == 1) mix
freely in one call. Attention is causal within each sequence. Accumulation is float32.

Axis letters (docs/glossary.md): T tokens, S sequences, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, P pages, L kv positions of one sequence.
"""

import jax
import jax.numpy as jnp

from xlaserve.quantization.kv_cache import SCALE_ELEMENTS, dequantize_kv, is_quantized_kv

# K/V positions per block of the online-softmax loop (rounded up to whole pages). The loop runs
# only over the blocks the longest sequence of the step uses, so the cost follows the real
# context lengths, not max_model_len.
KV_BLOCK_TOKENS = 32


def validate_inputs(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
) -> None:
    """Raises ValueError naming the first inconsistent shape or dtype."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if kv_cache.ndim != 4:
        raise ValueError(f"kv_cache must be [P, page_size, 2*K, H], got shape {kv_cache.shape}")
    num_tokens, num_heads, head_dim = q.shape
    _, _, kv_heads2, cache_head_dim = kv_cache.shape
    if is_quantized_kv(kv_cache.dtype):  # each row ends in its scale (quantization/kv_cache)
        cache_head_dim -= SCALE_ELEMENTS
    if cache_head_dim != head_dim:
        raise ValueError(f"head dim of q {q.shape} and kv_cache {kv_cache.shape} differ")
    if kv_heads2 % 2:
        raise ValueError(f"kv_cache axis 2 must be 2*K (K and V interleaved), got {kv_heads2}")
    if num_heads % (kv_heads2 // 2):
        raise ValueError(
            f"query heads N={num_heads} must be a multiple of kv heads K={kv_heads2 // 2}"
        )
    if kv_lens.ndim != 1:
        raise ValueError(f"kv_lens must be i32[S], got shape {kv_lens.shape}")
    num_seqs_cap = kv_lens.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != num_seqs_cap:
        raise ValueError(
            f"page_indices must be i32[S={num_seqs_cap}, pages_per_seq], got {page_indices.shape}"
        )
    if cu_q_lens.shape != (num_seqs_cap + 1,):
        raise ValueError(
            f"cu_q_lens must be i32[S + 1 = {num_seqs_cap + 1}], got {cu_q_lens.shape}"
        )
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be i32[1], got shape {num_seqs.shape}")
    for name, arr in (
        ("kv_lens", kv_lens),
        ("page_indices", page_indices),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
    del num_tokens


def ragged_paged_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Causal attention of ragged query rows over paged K/V.

    q: [T, N, H]; kv_cache: [P, page_size, 2K, H] (K and V interleaved on axis 2), or an
    int8 / float8 cache [P, page_size, 2K, H + 2] whose rows end in their scale
    (xlaserve/quantization/kv_cache.py);
    kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1];
    num_seqs: i32[1] (only the first num_seqs sequences are real).
    sliding_window: a query at position p sees keys at positions > p - sliding_window.
    soft_cap: scores become soft_cap * tanh(scores / soft_cap).
    Returns [T, N, H] in q's dtype; rows past cu_q_lens[num_seqs] (padding) are zeros.
    """
    validate_inputs(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, kv_heads2, _ = kv_cache.shape
    quantized = is_quantized_kv(kv_cache.dtype)
    num_kv_heads = kv_heads2 // 2
    group = num_heads // num_kv_heads
    block_pages = max(1, -(-KV_BLOCK_TOKENS // page_size))
    block_len = block_pages * page_size
    pages_per_seq = page_indices.shape[1]
    num_blocks_max = -(-pages_per_seq // block_pages)
    # Pad the page table to whole blocks; padded entries are masked by kv_lens.
    page_indices = jnp.pad(
        page_indices, ((0, 0), (0, num_blocks_max * block_pages - pages_per_seq))
    )

    token_ids = jnp.arange(num_tokens, dtype=jnp.int32)  # [T]
    # The sequence of each row: the number of sequence ends at or before it.
    seq_ids = jnp.searchsorted(cu_q_lens[1:], token_ids, side="right")  # [T]
    seq_ids = jnp.minimum(seq_ids, kv_lens.shape[0] - 1).astype(jnp.int32)
    row_valid = token_ids < cu_q_lens[num_seqs[0]]  # [T]
    q_lens = cu_q_lens[seq_ids + 1] - cu_q_lens[seq_ids]  # [T]
    row_kv_len = jnp.where(row_valid, kv_lens[seq_ids], 0)  # [T]
    q_pos = row_kv_len - q_lens + (token_ids - cu_q_lens[seq_ids])  # [T]
    row_pages = page_indices[seq_ids]  # [T, blocks * block_pages]
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)  # [T, K, G, H]
    real_kv = jnp.where(jnp.arange(kv_lens.shape[0]) < num_seqs[0], kv_lens, 0)
    num_blocks = (jnp.max(real_kv) + block_len - 1) // block_len

    def kv_block(b, carry):
        row_max, denom, acc = carry  # [T, K, G], [T, K, G], [T, K, G, H]
        pages = jax.lax.dynamic_slice_in_dim(row_pages, b * block_pages, block_pages, axis=1)
        kv = kv_cache[pages]  # [T, block_pages, page_size, 2K, H (+ scale)]
        kv = dequantize_kv(kv, head_dim) if quantized else kv.astype(jnp.float32)
        kv = kv.reshape(num_tokens, block_len, num_kv_heads, 2, head_dim)
        key_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)  # [Lb]
        mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < row_kv_len[:, None])
        if sliding_window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - sliding_window  # [T, Lb]
        # Masked-out slots may hold garbage (NaN in unused pages): zero them before use.
        k = jnp.where(mask[:, :, None, None], kv[:, :, :, 0], 0.0)  # [T, Lb, K, H]
        v = jnp.where(mask[:, :, None, None], kv[:, :, :, 1], 0.0)
        scores = jnp.einsum("tkgh,tlkh->tkgl", qg, k) * sm_scale  # [T, K, G, Lb]
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(scores - safe_max[..., None])  # exp(-inf) = 0 for masked keys
        rescale = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max, 0.0) - safe_max)
        rescale = jnp.where(jnp.isfinite(row_max), rescale, 0.0)
        denom = denom * rescale + jnp.sum(probs, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("tkgl,tlkh->tkgh", probs, v)
        return new_max, denom, acc

    init = (
        jnp.full((num_tokens, num_kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, kv_block, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # rows with no keys stay 0
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
