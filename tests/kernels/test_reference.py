"""The plain-jnp ragged paged attention and KV update against cases worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.kernels_pallas.kv_cache_update import kv_cache_update
from xlaserve.kernels_pallas.ragged_paged_attention import ragged_paged_attention

LN3 = math.log(3.0)


def i32(*xs):
    return jnp.asarray(xs, jnp.int32)


def two_key_cache(page_size=2, num_pages=3, fill=0.0):
    """One kv head, H=2. Page 1 holds k0=[0,0], v0=[1,0] and k1=[ln3,0], v1=[0,1]."""
    cache = np.full((num_pages, page_size, 2, 2), fill, np.float32)  # [P, ps, 2K, H]
    cache[1, 0, 0], cache[1, 0, 1] = [0, 0], [1, 0]
    cache[1, 1, 0], cache[1, 1, 1] = [LN3, 0], [0, 1]
    return jnp.asarray(cache)


def test_decode_weights_values_by_softmax_of_scores():
    # q=[1,0]: scores (0, ln3) -> softmax (1/4, 3/4) -> out = 1/4*v0 + 3/4*v1 = [0.25, 0.75].
    q = jnp.asarray([[[1.0, 0.0]]])  # [T=1, N=1, H=2]
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, 1), i32(1)
    )
    np.testing.assert_allclose(out[0, 0], [0.25, 0.75], atol=1e-6)


def test_prefill_is_causal():
    # Two new tokens: the first sees only k0 (out v0), the second both keys (as above).
    q = jnp.asarray([[[1.0, 0.0]], [[1.0, 0.0]]])
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, 2), i32(1)
    )
    np.testing.assert_allclose(out[:, 0], [[1, 0], [0.25, 0.75]], atol=1e-6)


def test_sliding_window_of_one_sees_only_itself():
    q = jnp.asarray([[[1.0, 0.0]], [[1.0, 0.0]]])
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, 2), i32(1), sliding_window=1
    )
    np.testing.assert_allclose(out[:, 0], [[1, 0], [0, 1]], atol=1e-6)


def test_soft_cap_squashes_scores():
    # cap 1: scores (tanh 0, tanh ln3) = (0, 0.8) -> weight of v1 = e^0.8 / (1 + e^0.8).
    q = jnp.asarray([[[1.0, 0.0]]])
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, 1), i32(1), soft_cap=1.0
    )
    w1 = math.exp(0.8) / (1 + math.exp(0.8))
    np.testing.assert_allclose(out[0, 0], [1 - w1, w1], atol=1e-6)


def test_sm_scale_multiplies_scores():
    # scale 2: scores (0, 2 ln3) -> weights (1/10, 9/10).
    q = jnp.asarray([[[1.0, 0.0]]])
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, 1), i32(1), sm_scale=2.0
    )
    np.testing.assert_allclose(out[0, 0], [0.1, 0.9], atol=1e-6)


def test_padding_rows_and_sequences_are_zero_and_nan_pages_do_not_leak():
    # Pages 0 and 2 are NaN; seq 0 decodes over page 1; seq 1 is padding (num_seqs = 1) and
    # its page table points at NaN pages; token rows 1..3 are padding.
    cache = two_key_cache(fill=np.nan)
    q = jnp.ones((4, 1, 2)) * jnp.asarray([1.0, 0.0])
    page_indices = jnp.asarray([[1, 0], [2, 0]], jnp.int32)
    out = ragged_paged_attention(q, cache, i32(2, 5), page_indices, i32(0, 1, 4), i32(1))
    np.testing.assert_allclose(out[0, 0], [0.25, 0.75], atol=1e-6)
    np.testing.assert_array_equal(out[1:], 0.0)


def test_empty_sequence_between_real_ones():
    # seq 0: q_len 1; seq 1: q_len 0, kv_len 0; seq 2: q_len 1 over the same two keys.
    q = jnp.asarray([[[1.0, 0.0]], [[1.0, 0.0]]])
    page_indices = jnp.asarray([[1], [0], [1]], jnp.int32)
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2, 0, 2), page_indices, i32(0, 1, 1, 2), i32(3)
    )
    np.testing.assert_allclose(out[:, 0], [[0.25, 0.75], [0.25, 0.75]], atol=1e-6)


def test_gqa_query_heads_share_their_kv_head():
    # N=2 query heads over K=1: head 0 q=[1,0] -> [0.25, 0.75]; head 1 q=[0,0] -> uniform.
    q = jnp.asarray([[[1.0, 0.0], [0.0, 0.0]]])
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, 1), i32(1)
    )
    np.testing.assert_allclose(out[0], [[0.25, 0.75], [0.5, 0.5]], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=jnp.zeros((1, 2))), "q must be"),
        (dict(kv_cache=jnp.zeros((3, 2, 3, 2))), "2\\*K"),
        (dict(kv_lens=jnp.zeros((2,), jnp.int32)), "page_indices must be"),
        (dict(cu_q_lens=i32(0, 1, 2)), "cu_q_lens must be"),
        (dict(num_seqs=i32(1, 1)), "num_seqs must be"),
        (dict(kv_lens=jnp.asarray([2.0])), "kv_lens must be int32"),
    ],
)
def test_bad_shapes_are_named(kwargs, message):
    args = dict(
        q=jnp.zeros((1, 1, 2)),
        kv_cache=two_key_cache(),
        kv_lens=i32(2),
        page_indices=i32(1).reshape(1, 1),
        cu_q_lens=i32(0, 1),
        num_seqs=i32(1),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(**args)


def test_kv_update_writes_slots_and_skips_padding():
    cache = jnp.zeros((2, 2, 2, 1))  # [P=2, ps=2, 2K=2, H=1]: 4 slots
    new = jnp.asarray([[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], [6.0]]])  # [T=3, 2K, H]
    out = kv_cache_update(new, cache, i32(3, -1, 0))
    expected = np.zeros((4, 2, 1), np.float32)
    expected[3], expected[0] = [[1.0], [2.0]], [[5.0], [6.0]]
    np.testing.assert_array_equal(out.reshape(4, 2, 1), expected)


def test_kv_update_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="new_kv must be"):
        kv_cache_update(jnp.zeros((3, 4, 1)), jnp.zeros((2, 2, 2, 1)), i32(0, 1, 2))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        kv_cache_update(jnp.zeros((3, 2, 1)), jnp.zeros((2, 2, 2, 1)), i32(0, 1))


def dense_attention(q, k, v, sm_scale):
    """Causal attention of the last q rows over all k/v rows of one sequence (numpy)."""
    q_len, kv_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [L, N, H]
    scores = np.einsum("tnh,lnh->ntl", q, k) * sm_scale
    q_pos = np.arange(kv_len - q_len, kv_len)[:, None]
    scores = np.where(np.arange(kv_len)[None, :] <= q_pos, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("ntl,lnh->tnh", probs, v)


@pytest.mark.parametrize("page_size, num_heads, num_kv_heads", [(4, 4, 2), (8, 3, 1), (16, 2, 2)])
def test_ragged_batch_with_shuffled_pages_equals_dense(page_size, num_heads, num_kv_heads):
    # Mixed batch: decode, chunked prefill, full prefill, lengths at page boundaries +-1.
    rng = np.random.default_rng(page_size)
    head_dim = 8
    kv_lens = [page_size + 1, 3 * page_size, 1, page_size - 1, 2 * page_size]
    q_lens = [1, page_size + 2, 1, page_size - 1, 1]
    pages_per_seq = 3
    num_pages = len(kv_lens) * pages_per_seq + 2
    cache = np.full((num_pages, page_size, 2 * num_kv_heads, head_dim), np.nan, np.float32)
    page_table = rng.permutation(num_pages)[: len(kv_lens) * pages_per_seq].reshape(-1, 3)
    qs, expected = [], []
    for s, (kv_len, q_len) in enumerate(zip(kv_lens, q_lens, strict=True)):
        k = rng.standard_normal((kv_len, num_kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((kv_len, num_kv_heads, head_dim)).astype(np.float32)
        for pos in range(kv_len):
            page, off = page_table[s, pos // page_size], pos % page_size
            cache[page, off, 0::2], cache[page, off, 1::2] = k[pos], v[pos]
        q = rng.standard_normal((q_len, num_heads, head_dim)).astype(np.float32)
        qs.append(q)
        expected.append(dense_attention(q, k, v, 0.3))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q_all = np.concatenate(qs + [np.zeros((3, num_heads, head_dim), np.float32)])  # 3 pad rows
    out = ragged_paged_attention(
        jnp.asarray(q_all),
        jnp.asarray(cache),
        jnp.asarray(kv_lens, jnp.int32),
        jnp.asarray(page_table, jnp.int32),
        jnp.asarray(cu),
        i32(len(kv_lens)),
        sm_scale=0.3,
    )
    np.testing.assert_allclose(out[: cu[-1]], np.concatenate(expected), atol=1e-5)
    np.testing.assert_array_equal(out[cu[-1] :], 0.0)
