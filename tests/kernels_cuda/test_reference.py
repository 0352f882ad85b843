"""The plain-torch references against cases worked out by hand and against the jnp truth."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from xlaserve.kernels_cuda.kv_cache_update.reference import kv_cache_update
from xlaserve.kernels_cuda.ragged_paged_attention.reference import ragged_paged_attention
from xlaserve.kernels_pallas.ragged_paged_attention import reference as jax_reference

LN3 = math.log(3.0)


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


def two_key_cache(page_size=2, num_pages=3, fill=float("nan")):
    """One kv head, H=2. Page 1 holds k0=[0,0], v0=[1,0] and k1=[ln3,0], v1=[0,1]; every other
    slot holds `fill` (NaN: a stray read shows)."""
    cache = torch.full((num_pages, page_size, 2, 2), fill)  # [P, ps, 2K, H]
    cache[1, 0, 0], cache[1, 0, 1] = torch.tensor([0.0, 0]), torch.tensor([1.0, 0])
    cache[1, 1, 0], cache[1, 1, 1] = torch.tensor([LN3, 0]), torch.tensor([0.0, 1])
    return cache


def attend(q, **kw):
    args = (two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0, len(q)), i32(1))
    return ragged_paged_attention(torch.tensor(q).reshape(len(q), 1, 2), *args, **kw)[:, 0]


def test_decode_weights_values_by_softmax_of_scores():
    # q=[1,0]: scores (0, ln3) -> softmax (1/4, 3/4) -> out = 1/4*v0 + 3/4*v1 = [0.25, 0.75].
    torch.testing.assert_close(attend([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]]))


def test_prefill_is_causal():
    # The first of two new tokens sees only k0 (out v0), the second both keys (as above).
    out = attend([[1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.25, 0.75]]))


def test_sliding_window_of_one_sees_only_itself():
    out = attend([[1.0, 0.0], [1.0, 0.0]], sliding_window=1)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_soft_cap_squashes_scores():
    # cap 1: scores (tanh 0, tanh ln3) = (0, 0.8) -> weight of v1 = e^0.8 / (1 + e^0.8).
    w1 = math.exp(0.8) / (1 + math.exp(0.8))
    torch.testing.assert_close(attend([[1.0, 0.0]], soft_cap=1.0), torch.tensor([[1 - w1, w1]]))


def test_padding_rows_and_sequences_past_num_seqs_are_zero():
    q = torch.ones(3, 1, 2)  # row 0 is sequence 0's; rows 1, 2 are padding
    out = ragged_paged_attention(
        q, two_key_cache(), i32(2, 7), i32(1, 0, 2, 2).reshape(2, 2), i32(0, 1, 3), i32(1)
    )
    assert out[1:].eq(0).all() and not out.isnan().any()


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match=r"cu_q_lens must be i32\[S \+ 1 = 2\]"):
        ragged_paged_attention(
            torch.ones(1, 1, 2), two_key_cache(), i32(2), i32(1).reshape(1, 1), i32(0), i32(1)
        )
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ragged_paged_attention(
            torch.ones(1, 3, 2), torch.zeros(3, 2, 4, 2), i32(2), i32(1).reshape(1, 1),
            i32(0, 1), i32(1),
        )  # fmt: skip


def test_matches_the_jnp_reference_on_a_ragged_gqa_batch():
    rng = np.random.default_rng(0)
    page_size, num_kv_heads, group, head_dim = 4, 2, 3, 8
    seqs = [(1, 5), (4, 4), (0, 3), (2, 9)]  # (q_len, kv_len)
    cache = rng.standard_normal((12, page_size, 2 * num_kv_heads, head_dim)).astype(np.float32)
    pages = rng.permutation(12)[:12].reshape(4, 3).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int32)
    kv_lens = np.array([kv for _, kv in seqs], np.int32)
    q = rng.standard_normal((int(cu[-1]) + 2, num_kv_heads * group, head_dim)).astype(np.float32)
    args = (q, cache, kv_lens, pages, cu, np.array([4], np.int32))
    for kw in ({}, dict(sliding_window=3), dict(soft_cap=2.0)):
        ours = ragged_paged_attention(*map(torch.from_numpy, args), sm_scale=0.4, **kw)
        truth = jax_reference.ragged_paged_attention(*map(jnp.asarray, args), sm_scale=0.4, **kw)
        np.testing.assert_allclose(ours.numpy(), np.asarray(truth), atol=2e-6, rtol=0)


def test_kv_update_writes_slots_in_place_and_skips_padding():
    cache = torch.zeros(2, 2, 2, 1)  # [P=2, ps=2, 2K=2, H=1]: flat slots 0..3
    new_kv = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], [6.0]]])  # [T=3, 2K, H]
    out = kv_cache_update(new_kv, cache, i32(3, -1, 0))
    assert out is cache
    expected = torch.zeros(4, 2, 1)
    expected[3], expected[0] = new_kv[0], new_kv[2]  # row 1 (slot -1) is dropped
    assert torch.equal(cache.view(4, 2, 1), expected)
