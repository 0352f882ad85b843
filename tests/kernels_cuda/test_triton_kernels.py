"""The Triton kernels against the plain-torch references (checked by hand in test_reference.py).

Interpreted on CPU (TRITON_INTERPRET=1, set in conftest.py), and compiled on CUDA (marked `gpu`,
see conftest.py). Every attention batch is ragged and mixes decode, prefill and chunked prefill
with lengths 0, 1 and page boundaries +-1 under a shuffled page table; unused pages, unused
slots of used pages, unused page-table entries and padding sequences past num_seqs all point
at NaN, and query padding rows hold NaN and must come out exactly zero.

Tolerances against the float32-accumulating reference: float32 atol = rtol = 2e-5 (summation
order only); bfloat16 atol = rtol = 2e-2 (both round the output to bfloat16, ~2^-8 relative).
The KV-cache write must be bit-exact.
"""

import numpy as np
import pytest
import torch

from tests.kernels_cuda.conftest import DEVICES, interpreted_kernels
from xlaserve.kernels_cuda.kv_cache_update import reference as kv_reference
from xlaserve.kernels_cuda.ragged_paged_attention import reference

triton_kernels = pytest.importorskip("xlaserve.kernels_cuda.ragged_paged_attention.triton_kernel")
kv_triton = pytest.importorskip("xlaserve.kernels_cuda.kv_cache_update.triton_kernel")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
HEADS = {"mha": (2, 2), "gqa2": (4, 2), "gqa3": (6, 2), "mqa": (4, 1)}


def mixed_seqs(ps: int) -> list[tuple[int, int]]:
    """(q_len, kv_len) per sequence around the page size ps."""
    return [
        (1, ps + 1),  # decode one past a page boundary
        (0, 0),  # empty sequence
        (ps - 1, ps - 1),  # prefill one short of a page
        (1, 1),  # decode of the very first token
        (3, 2 * ps),  # chunked prefill ending on a page boundary
        (ps + 1, ps + 1),  # prefill one past a page boundary
        (1, 3 * ps),  # decode on a page boundary
        (0, 5),  # a sequence with cached tokens but no new ones this step
    ]


def make_batch(seqs, *, heads, head_dim, page_size, dtype, device, seed=0, pad_seqs=2):
    """Reference-contract arguments for `seqs` with NaN wherever nothing may be read."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = HEADS[heads]
    used = [-(-kv // page_size) for _, kv in seqs]
    pages_per_seq, num_pages = max(used) + 1, sum(used) + 4
    cache = torch.full((num_pages, page_size, 2 * num_kv_heads, head_dim), float("nan"))
    num_seqs_cap = len(seqs) + pad_seqs
    # Unused entries and padding sequences point anywhere, NaN pages included.
    pages = torch.randint(0, num_pages, (num_seqs_cap, pages_per_seq), generator=gen)
    order = torch.randperm(num_pages, generator=gen)  # shuffled page table
    next_page = 0
    for s, (_, kv_len) in enumerate(seqs):
        pages[s, : used[s]] = order[next_page : next_page + used[s]]
        next_page += used[s]
        for pos in range(kv_len):
            slot = torch.randn(2 * num_kv_heads, head_dim, generator=gen)
            cache[pages[s, pos // page_size], pos % page_size] = slot
    q_lens = [q for q, _ in seqs]
    cu = torch.tensor([0, *np.cumsum(q_lens)] + [sum(q_lens)] * pad_seqs, dtype=torch.int32)
    kv_lens = torch.tensor([kv for _, kv in seqs] + [3 * page_size] * pad_seqs)
    q = torch.randn(sum(q_lens) + 3, num_heads, head_dim, generator=gen)
    q[sum(q_lens) :] = float("nan")  # padding rows
    tensors = (q.to(dtype), cache.to(dtype), kv_lens.int(), pages.int(), cu)
    num_seqs = torch.tensor([len(seqs)], dtype=torch.int32)
    return tuple(t.to(device) for t in (*tensors, num_seqs))


def check_attention(args, dtype, blocks=None, **kw):
    num_real = int(args[4][int(args[5][0])])
    expected = reference.ragged_paged_attention(*args, **kw)
    got = triton_kernels.ragged_paged_attention(*args, **kw, **(blocks or {}))
    assert not got.isnan().any()
    assert got[num_real:].eq(0).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


# A grid that covers every value of every axis without the full product.
GRID = [
    # (heads, head_dim, page_size, dtype, options, block sizes)
    ("mha", 16, 4, torch.float32, {}, {}),
    ("gqa2", 32, 4, torch.float32, dict(sliding_window=5), {}),
    ("gqa3", 16, 8, torch.float32, {}, dict(block_rows=32, block_kv=16)),
    ("mqa", 64, 16, torch.float32, dict(sliding_window=17), dict(block_kv=16)),
    ("gqa2", 16, 16, torch.float32, dict(soft_cap=3.0), dict(block_rows=64, block_kv=64)),
    ("gqa3", 24, 4, torch.float32, dict(sliding_window=1), {}),  # H not a power of two
    ("gqa2", 32, 8, torch.bfloat16, {}, {}),
    ("mqa", 16, 4, torch.bfloat16, dict(sliding_window=3, soft_cap=2.0), {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("heads", "head_dim", "page_size", "dtype", "options", "blocks"), GRID)
def test_attention_kernel_matches_reference(
    device, heads, head_dim, page_size, dtype, options, blocks
):
    args = make_batch(
        mixed_seqs(page_size), heads=heads, head_dim=head_dim, page_size=page_size,
        dtype=dtype, device=device,
    )  # fmt: skip
    check_attention(args, dtype, blocks, sm_scale=head_dim**-0.5, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_kernel_on_decode_only_and_empty_batches(device):
    decode = make_batch([(1, n) for n in (1, 3, 4, 5, 9)], heads="gqa2", head_dim=16,
                        page_size=4, dtype=torch.float32, device=device)  # fmt: skip
    check_attention(decode, torch.float32, sm_scale=0.25)
    empty = make_batch([(0, 0)], heads="mha", head_dim=16, page_size=4, dtype=torch.float32,
                       device=device)  # fmt: skip
    empty[5].zero_()  # num_seqs = 0: every row is padding
    assert triton_kernels.ragged_paged_attention(*empty).eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_kernel_window_narrower_than_a_query_block(device):
    # 64 query tokens per program over 16-key tiles with a window of 3: the block's later rows
    # see no key at all in its first tiles (their running max stays -inf), which must not NaN.
    args = make_batch([(40, 40), (1, 9), (20, 30)], heads="mqa", head_dim=16, page_size=4,
                      dtype=torch.float32, device=device)  # fmt: skip
    blocks = dict(block_rows=64, block_kv=16)
    check_attention(args, torch.float32, blocks, sm_scale=0.25, sliding_window=3)


@interpreted_kernels
def test_attention_kernel_refuses_bad_inputs():
    args = make_batch([(1, 2)], heads="mha", head_dim=16, page_size=4, dtype=torch.float32,
                      device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="block_kv must be a power of two >= 16"):
        triton_kernels.ragged_paged_attention(*args, block_kv=24)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        triton_kernels.ragged_paged_attention(*args[:2], args[2].long(), *args[3:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("cache_dtype", "new_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_kv_update_kernel_is_bit_exact(device, cache_dtype, new_dtype):
    gen = torch.Generator().manual_seed(1)
    cache = torch.full((6, 4, 6, 16), float("nan")).to(cache_dtype)  # [P, ps, 2K=6, H=16]
    new_kv = torch.randn(7, 6, 16, generator=gen).to(new_dtype)
    slots = torch.tensor([5, -1, 0, 23, 12, -1, 3], dtype=torch.int32)  # first/last slot, pads
    expected = kv_reference.kv_cache_update(new_kv, cache.clone(), slots)
    cache, new_kv, slots = cache.to(device), new_kv.to(device), slots.to(device)
    out = kv_triton.kv_cache_update(new_kv, cache, slots)
    assert out is cache
    assert torch.equal(out.cpu().nan_to_num(7.0), expected.nan_to_num(7.0))  # NaN == untouched
    # Rows given as a strided view (K and V stacked the way the model builds them) too.
    k, v = torch.randn(2, 2, 3, 16, generator=gen).to(device)  # [T=2, K=3, H] each
    strided = torch.stack([k, v], dim=2).view(2, 6, 16)
    kv_triton.kv_cache_update(strided, out, torch.tensor([1, 2], dtype=torch.int32).to(device))
    assert torch.equal(out.view(-1, 6, 16)[1:3].float(), strided.to(cache_dtype).float())
